import { memory } from '../memory.mjs';

export function emit(stream, event) {
  memory.emitted.push([stream, event]);
}
