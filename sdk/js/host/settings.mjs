import { memory } from '../memory.mjs';

export const get = (name) => memory.settings.get(name);
