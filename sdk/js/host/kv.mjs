import { memory } from '../memory.mjs';

const table = (name) => memory.tables.get(name) ?? memory.tables.set(name, new Map()).get(name);
export const get = (t, key) => memory.tables.get(t)?.get(key);
export const put = (t, key, value) => void table(t).set(key, value);
export { remove as delete };
function remove(t, key) {
  memory.tables.get(t)?.delete(key);
}
export function scan(t, prefix, startAfter, limit) {
  return [...(memory.tables.get(t) ?? new Map()).entries()]
    .filter(([k]) => k.startsWith(prefix) && (startAfter === undefined || k > startAfter))
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .slice(0, limit)
    .map(([key, value]) => ({ key, value }));
}
