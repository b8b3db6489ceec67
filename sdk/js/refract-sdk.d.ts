// TypeScript declarations for refract-sdk.js and the records of the
// refract:plugin@0.1.1 WIT interfaces it wraps (written by hand: `jco types`
// could not read WIT files on the machines this was built on).

/** An event as the host delivers it (WIT `types.event`). */
export interface WitEvent {
  stream: string;
  partition: number;
  offset: bigint;
  key?: string;
  eventType: string;
  time: bigint;
  headers: [string, string][];
  contentType: string;
  data: Uint8Array;
}

/** WIT `types.failure`, thrown by `handle`/`enrich`. */
export type Failure = { tag: 'rejected'; val: string } | { tag: 'transient'; val: string };

/** WIT `types.field-type`. */
export type FieldType = 'keyword' | 'text' | 'i64' | 'f64' | 'date' | 'bool';

/** WIT `emit.outgoing`. */
export interface Outgoing {
  eventType: string;
  key?: string;
  time: bigint;
  headers: [string, string][];
  data: Uint8Array;
}

/** An event that can never be handled: it becomes a dead letter. */
export class Rejected extends Error {}
/** A condition that may pass: the batch is retried with back-off. */
export class Transient extends Error {}

export class F64 {
  constructor(value: number);
  value: number;
}
/** Mark a number to be written as a float (`10.0`), as Rust and Python write f64 values. */
export function f64(value: number): F64;
/** JSON text as the Rust SDK writes it (no spaces, insertion order, F64 as floats). */
export function stringify(value: unknown): string;
export function dumps(value: unknown): Uint8Array;
/** An amount in whole cents, rounding half away from zero. */
export function cents(amount: number): number;

/** An event as a plugin sees it: `time` and `offset` as numbers. */
export class Event {
  constructor(raw: WitEvent);
  stream: string;
  partition: number;
  offset: number;
  key: string | null;
  eventType: string;
  time: number;
  headers: [string, string][];
  contentType: string;
  data: Uint8Array;
  /** The data decoded from JSON; data that does not decode rejects the event. */
  json<T = any>(): T;
  header(name: string): string | undefined;
}

export class Table<V = any> {
  constructor(name: string);
  readonly name: string;
  get(key: string): V | undefined;
  put(key: string, value: V): void;
  delete(key: string): void;
  scan(prefix?: string, startAfter?: string, limit?: number): [string, V][];
}

export class Index<D = any> {
  constructor(name: string);
  readonly name: string;
  upsert(id: string, document: D): void;
  delete(id: string): void;
}

export class IndexMapping {
  constructor(name: string);
  field(name: string, type: FieldType, stored?: boolean, fast?: boolean): this;
  keyword(name: string): this;
  text(name: string): this;
  i64(name: string): this;
  f64(name: string): this;
  date(name: string): this;
  bool(name: string): this;
}

export class Manifest {
  constructor(name: string, version: string, schemaVersion?: number);
  subscribe(stream: string, eventTypes?: string[]): this;
  table(table: Table): this;
  /** A table whose keys are its events' keys (or start with them and `separator`): lookups go to one shard. */
  keyedTable(table: Table, separator?: string): this;
}

/** WIT 0.1.1's `keyed-table`. */
export interface KeyedTable {
  table: string;
  separator?: string;
}

export class NewEvent {
  constructor(eventType: string, data: unknown, options?: { key?: string; time?: number; headers?: [string, string][] });
  derivedFrom(event: Event): this;
  toWit(): Outgoing;
}

export function emit(stream: string, event: NewEvent): void;
export function lookup<V = any>(projection: string, table: string, key: string): V | undefined;
export function setting(name: string, fallback?: string): string | undefined;
export function log(level: 'trace' | 'debug' | 'info' | 'warn' | 'error', message: string): void;

export function projection(options: {
  manifest: Manifest;
  apply?: (event: Event) => void;
  handleBatch?: (events: Event[]) => void;
  indexes?: IndexMapping[];
}): { manifest(): Manifest; indexes(): IndexMapping[]; keyedTables(): KeyedTable[]; handle(events: WitEvent[]): void };

export function enricher(options: {
  manifest: Manifest;
  enrichOne?: (event: Event) => NewEvent[];
  enrichBatch?: (events: Event[]) => NewEvent[];
}): { manifest(): Manifest; enrich(events: WitEvent[]): Outgoing[] };
