// Write Refract projections and enrichers in JavaScript.
//
// A plugin is an ES module that exports the functions of its WIT world; this
// SDK builds them for you:
//
//   import { Manifest, Table, Rejected, projection, f64 } from './refract-sdk.js';
//   const COUNTS = new Table('counts');
//   export const { manifest, handle, indexes } = projection({
//     manifest: new Manifest('count-by-type', '1.0.0').subscribe('orders').table(COUNTS),
//     apply(event) {
//       const count = COUNTS.get(event.eventType) ?? { n: 0 };
//       count.n += 1;
//       COUNTS.put(event.eventType, count);
//     },
//   });
//
// Build it with `refract plugin build` (componentize-js, world
// refract:plugin/search-projection, or refract:plugin/enricher).
//
// Failures: throw `new Rejected(reason)` for an event that can never be
// handled (a dead letter) and `new Transient(reason)` for a condition worth
// retrying. Any other exception rejects the event with its message.

import * as kv from 'refract:plugin/kv@0.1.1';
import * as search from 'refract:plugin/search@0.1.1';
import * as emitter from 'refract:plugin/emit@0.1.1';
import * as lookups from 'refract:plugin/lookup@0.1.1';
import * as settings from 'refract:plugin/settings@0.1.1';
import * as logger from 'refract:plugin/log@0.1.1';

/** An event that can never be handled: it becomes a dead letter. */
export class Rejected extends Error {}

/** A condition that may pass: the runtime retries the batch with back-off. */
export class Transient extends Error {}

/** A number to be written as a float (`10.0`, not `10`), as Rust and Python write f64 values. */
export class F64 {
  constructor(value) {
    this.value = value;
  }
}

/** Mark `value` as a float for {@link dumps}. */
export const f64 = (value) => new F64(Number(value));

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function number(n, float) {
  if (!Number.isFinite(n)) throw new Rejected(`cannot encode ${n} as JSON`);
  const text = JSON.stringify(n);
  return float && Number.isInteger(n) && Math.abs(n) < 1e16 ? `${text}.0` : text;
}

/**
 * JSON text as the Rust SDK writes it: no spaces, keys in insertion order,
 * numbers marked with {@link f64} written as floats, BigInts as integers.
 */
export function stringify(value) {
  if (value instanceof F64) return number(value.value, true);
  if (value === null || value === undefined) return 'null';
  switch (typeof value) {
    case 'number':
      return number(value, false);
    case 'bigint':
      return value.toString();
    case 'string':
    case 'boolean':
      return JSON.stringify(value);
    case 'object':
      if (Array.isArray(value)) return `[${value.map(stringify).join(',')}]`;
      return `{${Object.entries(value)
        .filter(([, v]) => v !== undefined)
        .map(([k, v]) => `${JSON.stringify(k)}:${stringify(v)}`)
        .join(',')}}`;
    default:
      throw new Rejected(`cannot encode a ${typeof value} as JSON`);
  }
}

/** {@link stringify}, as UTF-8 bytes. */
export const dumps = (value) => encoder.encode(stringify(value));

const message = (error) => {
  const payload = error?.payload ?? error;
  return payload?.val ?? payload?.message ?? String(payload);
};

/** An event as a plugin sees it: the WIT record with `time` and `offset` as numbers. */
export class Event {
  constructor(raw) {
    this.stream = raw.stream;
    this.partition = raw.partition;
    this.offset = Number(raw.offset);
    this.key = raw.key ?? null;
    this.eventType = raw.eventType;
    this.time = Number(raw.time);
    this.headers = raw.headers;
    this.contentType = raw.contentType;
    this.data = raw.data;
  }

  /** The data decoded from JSON; data that does not decode rejects the event. */
  json() {
    try {
      return JSON.parse(decoder.decode(this.data));
    } catch (e) {
      throw new Rejected(
        `${this.eventType} at ${this.stream}/${this.partition}@${this.offset}: data does not decode: ${e.message}`,
      );
    }
  }

  /** The first header named `name`. */
  header(name) {
    return this.headers.find(([k]) => k === name)?.[1];
  }
}

/** A key/value table of the plugin holding JSON values. */
export class Table {
  constructor(name) {
    this.name = name;
  }

  #call(f) {
    try {
      return f();
    } catch (e) {
      throw new Rejected(`table ${this.name}: ${message(e)}`);
    }
  }

  /** The value under `key`, or `undefined`. */
  get(key) {
    const raw = this.#call(() => kv.get(this.name, key));
    return raw === undefined || raw === null ? undefined : JSON.parse(decoder.decode(raw));
  }

  /** Store `value` under `key` (see {@link stringify} and {@link f64}). */
  put(key, value) {
    this.#call(() => kv.put(this.name, key, dumps(value)));
  }

  /** Remove `key`; removing an absent key is not an error. */
  delete(key) {
    this.#call(() => kv.delete(this.name, key));
  }

  /** Up to `limit` `[key, value]` pairs whose key starts with `prefix`, after `startAfter`. */
  scan(prefix = '', startAfter = undefined, limit = 1000) {
    return this.#call(() => kv.scan(this.name, prefix, startAfter, limit)).map((e) => [
      e.key,
      JSON.parse(decoder.decode(e.value)),
    ]);
  }
}

/** A search index of the projection. */
export class Index {
  constructor(name) {
    this.name = name;
  }

  upsert(id, document) {
    try {
      search.upsert(this.name, id, dumps(document));
    } catch (e) {
      throw new Rejected(`index ${this.name}: ${message(e)}`);
    }
  }

  delete(id) {
    try {
      search.delete(this.name, id);
    } catch (e) {
      throw new Rejected(`index ${this.name}: ${message(e)}`);
    }
  }
}

/** The mapping of a search index. */
export class IndexMapping {
  constructor(name) {
    this.name = name;
    this.fields = [];
  }
  field(name, type, stored = true, fast = false) {
    this.fields.push({ name, type, stored, fast });
    return this;
  }
  keyword(name) { return this.field(name, 'keyword', true, true); }
  text(name) { return this.field(name, 'text', true, false); }
  i64(name) { return this.field(name, 'i64', true, true); }
  f64(name) { return this.field(name, 'f64', true, true); }
  date(name) { return this.field(name, 'date', true, true); }
  bool(name) { return this.field(name, 'bool', true, true); }
}

/** What a plugin declares: name, versions, streams and event types, tables. */
export class Manifest {
  constructor(name, version, schemaVersion = 1) {
    this.name = name;
    this.version = version;
    this.schemaVersion = schemaVersion;
    this.subscriptions = [];
    this.tables = [];
    this.keyedTables = [];
  }
  /** Read `stream`, only `eventTypes` of it (every type when empty). */
  subscribe(stream, eventTypes = []) {
    this.subscriptions.push({ stream, eventTypes });
    return this;
  }
  /** Declare a table the plugin writes. */
  table(table) {
    this.tables.push(table.name);
    return this;
  }
  /**
   * Declare a table whose every key is the key of the events it is written
   * for (or that key, `separator` and more). On a partitioned projection a
   * lookup of one key then asks the one shard that can hold it.
   */
  keyedTable(table, separator = undefined) {
    this.keyedTables.push({ table: table.name, separator });
    return this.table(table);
  }
}

/** An event to emit (projections) or return (enrichers). */
export class NewEvent {
  constructor(eventType, data, { key, time = 0, headers = [] } = {}) {
    this.eventType = eventType;
    this.data = data;
    this.key = key;
    this.time = time;
    this.headers = headers;
  }
  /** Take the key (unless set), time and headers of `event`. */
  derivedFrom(event) {
    this.key ??= event.key ?? undefined;
    this.time = event.time;
    this.headers = [...event.headers, ...this.headers];
    return this;
  }
  toWit() {
    return {
      eventType: this.eventType,
      key: this.key ?? undefined,
      time: BigInt(this.time),
      headers: this.headers,
      data: dumps(this.data),
    };
  }
}

/** Publish `event` to `stream` once the batch commits (projections). */
export function emit(stream, event) {
  try {
    emitter.emit(stream, event.toWit());
  } catch (e) {
    throw new Rejected(`emitting to ${stream}: ${message(e)}`);
  }
}

/** The value under `key` in `table` of another projection, or `undefined`. */
export function lookup(projection, table, key) {
  let raw;
  try {
    raw = lookups.get(projection, table, key);
  } catch (e) {
    const error = e?.payload ?? e;
    if (error?.tag === 'unknown-projection') throw new Transient(`lookup in ${projection}: ${error.val}`);
    throw new Rejected(`lookup in ${projection}: ${message(e)}`);
  }
  return raw === undefined || raw === null ? undefined : JSON.parse(decoder.decode(raw));
}

/** The setting `name` from `plugins.<name>.settings` in refract.yaml, as text. */
export function setting(name, fallback = undefined) {
  return settings.get(name) ?? fallback;
}

/** Send `text` to the runtime's log (level: trace, debug, info, warn, error). */
export function log(level, text) {
  logger.log(level, text);
}

/** An amount in whole cents, rounding half away from zero (as Rust's `f64::round`). */
export function cents(amount) {
  const scaled = amount * 100;
  return Math.sign(scaled) * Math.floor(Math.abs(scaled) + 0.5);
}

function failure(e) {
  if (e instanceof Transient) return { tag: 'transient', val: e.message };
  if (e instanceof Rejected) return { tag: 'rejected', val: e.message };
  // An exception the plugin did not mean: where it came from, for the dead letter.
  const stack = typeof e?.stack === 'string' && e.stack.trim() ? `\n${e.stack.trimEnd()}` : '';
  return { tag: 'rejected', val: `${e?.name ?? 'Error'}: ${e?.message ?? String(e)}${stack}` };
}

/**
 * The exports of a projection: `{ manifest, handle, indexes, keyedTables }`. Give
 * `manifest` and `apply(event)` (or `handleBatch(events)`), and `indexes`
 * (IndexMappings) for search.
 */
export function projection({ manifest, apply, handleBatch, indexes = [] }) {
  const batch = handleBatch ?? ((events) => events.forEach((e) => apply(e)));
  return {
    manifest: () => manifest,
    indexes: () => indexes,
    keyedTables: () => manifest.keyedTables,
    handle(events) {
      try {
        batch(events.map((raw) => new Event(raw)));
      } catch (e) {
        throw failure(e);
      }
    },
  };
}

/**
 * The exports of an enricher: `{ manifest, enrich }`. Give `manifest` and
 * `enrichOne(event)` returning its outputs (NewEvents), or `enrichBatch(events)`.
 */
export function enricher({ manifest, enrichOne, enrichBatch }) {
  const batch = enrichBatch ?? ((events) => events.flatMap((e) => enrichOne(e)));
  return {
    manifest: () => manifest,
    enrich(events) {
      try {
        return batch(events.map((raw) => new Event(raw))).map((out) => out.toWit());
      } catch (e) {
        throw failure(e);
      }
    },
  };
}
