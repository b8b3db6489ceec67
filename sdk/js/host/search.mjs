import { memory } from '../memory.mjs';

export function upsert(index, id, document) {
  (memory.indexes.get(index) ?? memory.indexes.set(index, new Map()).get(index)).set(id, document);
}
export { remove as delete };
function remove(index, id) {
  memory.indexes.get(index)?.delete(id);
}
