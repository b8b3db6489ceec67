import { memory } from '../memory.mjs';

const encoder = new TextEncoder();

export function get(projection, table, key) {
  const tables = memory.lookups.get(projection);
  if (!tables) throw { payload: { tag: 'unknown-projection', val: `no projection ${projection}` } };
  const rows = tables.get(table);
  if (!rows) throw { payload: { tag: 'unknown-table', val: `${projection} has no table ${table}` } };
  const value = rows.get(key);
  return value === undefined ? undefined : encoder.encode(JSON.stringify(value));
}
