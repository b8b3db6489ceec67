import { memory } from '../memory.mjs';

export function log(level, message) {
  memory.logs.push([level, message]);
}
