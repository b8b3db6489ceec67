// In-memory stand-ins for the host: tables, indexes, emitted events, logs,
// settings and other projections' tables for lookups. Tests read and set
// them through `memory`; `reset()` empties them.

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export const memory = {
  tables: new Map(),
  indexes: new Map(),
  emitted: [],
  logs: [],
  settings: new Map(),
  /** projection → table → key → JSON value, for lookups. */
  lookups: new Map(),
  /** The JSON value under `key` in `table`. */
  get(table, key) {
    const raw = this.tables.get(table)?.get(key);
    return raw === undefined ? undefined : JSON.parse(decoder.decode(raw));
  },
  /** The document `id` of `index`. */
  document(index, id) {
    const raw = this.indexes.get(index)?.get(id);
    return raw === undefined ? undefined : JSON.parse(decoder.decode(raw));
  },
};

export function reset() {
  for (const key of ['tables', 'indexes', 'settings', 'lookups']) memory[key] = new Map();
  memory.emitted = [];
  memory.logs = [];
}

/** An event as the host delivers it; `data` is JSON-encoded unless it is a string. */
export function event(stream, eventType, data, { key, time = 0, partition = 0, offset = 0, headers = [] } = {}) {
  const bytes = typeof data === 'string' ? encoder.encode(data) : encoder.encode(JSON.stringify(data));
  return {
    stream,
    partition,
    offset: BigInt(offset),
    key,
    eventType,
    time: BigInt(time),
    headers,
    contentType: 'application/json',
    data: bytes,
  };
}
