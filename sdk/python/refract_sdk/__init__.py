"""Write Refract projections and enrichers in Python.

A plugin is a module that defines a class named ``WitWorld`` (componentize-py
looks for it) deriving from :class:`Projection` or :class:`Enricher`::

    from refract_sdk import Manifest, Projection, Rejected, Table, data

    COUNTS = Table("counts")

    class WitWorld(Projection):
        MANIFEST = Manifest("count-by-type", "1.0.0").subscribe("orders").table(COUNTS)

        def apply(self, event):
            count = COUNTS.get(event.event_type) or {"n": 0}
            count["n"] += 1
            COUNTS.put(event.event_type, count)

Build it with ``refract plugin build`` (or ``componentize-py -d wit -w
refract:plugin/search-projection componentize app -p <sdk/python> -o app.wasm``).

Failures: raise :class:`Rejected` for an event that can never be handled (it
becomes a dead letter) and :class:`Transient` for a condition worth retrying.
Any other exception rejects the event too, with its type and message, so a
bug in one event never stops the others.
"""

import json
import math
import traceback
from typing import Any, Dict, Iterable, List, Optional, Tuple

from componentize_py_types import Err
from wit_world.imports import emit as _emit
from wit_world.imports import kv as _kv
from wit_world.imports import log as _log
from wit_world.imports import lookup as _lookup
from wit_world.imports import settings as _settings
from wit_world.imports import types

try:  # projections only: the enricher world has no search
    from wit_world.imports import search as _search
except ImportError:
    _search = None

__all__ = [
    "Enricher", "Event", "FieldType", "Index", "IndexMapping", "Manifest", "NewEvent", "Projection",
    "Rejected", "Transient", "Table", "cents", "data", "dumps", "log", "lookup", "setting",
]

Event = types.Event
FieldType = types.FieldType


class Rejected(Exception):
    """This event can never be handled: it becomes a dead letter, the rest are applied."""


class Transient(Exception):
    """A condition that may pass: the runtime retries the batch with back-off."""


def dumps(value: Any) -> bytes:
    """JSON as the Rust SDK writes it (serde_json): no spaces, keys in the order given,
    floats in their shortest form (``10.0``, ``0.1``), non-ASCII characters as they are."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def data(event: "types.Event") -> Any:
    """The event's data, decoded from JSON; data that does not decode rejects the event."""
    try:
        return json.loads(event.data)
    except ValueError as e:
        raise Rejected(
            f"{event.event_type} at {event.stream}/{event.partition}@{event.offset}: data does not decode: {e}"
        ) from None


def cents(amount: float) -> int:
    """An amount in whole cents, rounding half away from zero (as Rust's ``f64::round``)."""
    scaled = amount * 100.0
    return int(math.copysign(math.floor(abs(scaled) + 0.5), scaled))


def _message(error: Any) -> str:
    return getattr(error, "value", str(error))


class Table:
    """A key/value table of the plugin holding JSON values. Reads see the batch's own
    writes; writes become visible to queries when the batch commits."""

    def __init__(self, name: str):
        self.name = name

    def get(self, key: str) -> Any:
        """The value under ``key``, or ``None``."""
        try:
            raw = _kv.get(self.name, key)
        except Err as e:
            raise Rejected(f"table {self.name}: {_message(e.value)}") from None
        return None if raw is None else json.loads(raw)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (anything ``json`` can encode) under ``key``."""
        try:
            _kv.put(self.name, key, dumps(value))
        except Err as e:
            raise Rejected(f"table {self.name}: {_message(e.value)}") from None

    def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key is not an error."""
        try:
            _kv.delete(self.name, key)
        except Err as e:
            raise Rejected(f"table {self.name}: {_message(e.value)}") from None

    def scan(self, prefix: str = "", start_after: Optional[str] = None, limit: int = 1000) -> List[Tuple[str, Any]]:
        """Up to ``limit`` entries whose key starts with ``prefix``, in key order, after ``start_after``."""
        try:
            entries = _kv.scan(self.name, prefix, start_after, limit)
        except Err as e:
            raise Rejected(f"table {self.name}: {_message(e.value)}") from None
        return [(entry.key, json.loads(entry.value)) for entry in entries]


class IndexMapping:
    """The mapping of a search index: field name → type, like Elasticsearch's."""

    def __init__(self, name: str):
        self.name = name
        self.fields: List[types.FieldMapping] = []

    def field(self, name: str, type: "types.FieldType", stored: bool = True, fast: bool = False) -> "IndexMapping":
        self.fields.append(types.FieldMapping(name, type, stored, fast))
        return self

    def keyword(self, name: str) -> "IndexMapping":
        return self.field(name, FieldType.KEYWORD, True, True)

    def text(self, name: str) -> "IndexMapping":
        return self.field(name, FieldType.TEXT, True, False)

    def i64(self, name: str) -> "IndexMapping":
        return self.field(name, FieldType.I64, True, True)

    def f64(self, name: str) -> "IndexMapping":
        return self.field(name, FieldType.F64, True, True)

    def date(self, name: str) -> "IndexMapping":
        return self.field(name, FieldType.DATE, True, True)

    def bool(self, name: str) -> "IndexMapping":
        return self.field(name, FieldType.BOOL, True, True)

    def to_wit(self) -> "types.IndexMapping":
        return types.IndexMapping(self.name, list(self.fields))


class Index:
    """A search index of the projection; declare its mapping in ``Projection.INDEXES``."""

    def __init__(self, name: str):
        self.name = name

    def upsert(self, id: str, document: Dict[str, Any]) -> None:
        """Index ``document`` under ``id``; one that does not fit the mapping rejects the event."""
        if _search is None:
            raise Rejected("search is not available to enrichers")
        try:
            _search.upsert(self.name, id, dumps(document))
        except Err as e:
            raise Rejected(f"index {self.name}: {_message(e.value)}") from None

    def delete(self, id: str) -> None:
        if _search is None:
            raise Rejected("search is not available to enrichers")
        try:
            _search.delete(self.name, id)
        except Err as e:
            raise Rejected(f"index {self.name}: {_message(e.value)}") from None


class Manifest:
    """What a plugin declares: name, versions, the streams and event types it reads, its tables."""

    def __init__(self, name: str, version: str, schema_version: int = 1):
        self.name, self.version, self.schema_version = name, version, schema_version
        self.subscriptions: List[types.Subscription] = []
        self.tables: List[str] = []
        self.keyed: List[Tuple[str, Optional[str]]] = []

    def subscribe(self, stream: str, event_types: Iterable[str] = ()) -> "Manifest":
        """Read ``stream``, delivering only ``event_types`` (every type when empty)."""
        self.subscriptions.append(types.Subscription(stream, list(event_types)))
        return self

    def table(self, table: Table) -> "Manifest":
        """Declare a table the plugin writes."""
        self.tables.append(table.name)
        return self

    def keyed_table(self, table: Table, separator: Optional[str] = None) -> "Manifest":
        """Declare a table whose every key is the key of the events it is written for
        (or that key, ``separator`` and more). On a partitioned projection a lookup of
        one key then asks the one shard that can hold it instead of every shard."""
        self.keyed.append((table.name, separator))
        return self.table(table)

    def keyed_to_wit(self) -> List["types.KeyedTable"]:
        return [types.KeyedTable(table, separator) for table, separator in self.keyed]

    def to_wit(self) -> "types.Manifest":
        return types.Manifest(self.name, self.version, self.schema_version, list(self.subscriptions), list(self.tables))


class NewEvent:
    """An event to emit (projections) or to return (enrichers)."""

    def __init__(self, event_type: str, data: Any, key: Optional[str] = None, time: int = 0,
                 headers: Iterable[Tuple[str, str]] = ()):
        self.event_type, self.data, self.key, self.time = event_type, data, key, time
        self.headers = list(headers)

    def derived_from(self, event: "types.Event") -> "NewEvent":
        """Take the key (unless set), the time and the headers of ``event``."""
        if self.key is None:
            self.key = event.key
        self.time = event.time
        self.headers = list(event.headers) + self.headers
        return self

    def to_wit(self) -> "_emit.Outgoing":
        return _emit.Outgoing(self.event_type, self.key, self.time, list(self.headers), dumps(self.data))


def emit(stream: str, event: NewEvent) -> None:
    """Publish ``event`` to ``stream`` once the batch commits (projections)."""
    try:
        _emit.emit(stream, event.to_wit())
    except Err as e:
        raise Rejected(f"emitting to {stream}: {_message(e.value)}") from None


def lookup(projection: str, table: str, key: str) -> Any:
    """The value under ``key`` in ``table`` of another projection, or ``None``. A projection
    that is not running is transient (retried); a table it does not declare rejects the event."""
    try:
        raw = _lookup.get(projection, table, key)
    except Err as e:
        if type(e.value).__name__.endswith("UnknownProjection"):
            raise Transient(f"lookup in {projection}: {_message(e.value)}") from None
        raise Rejected(f"lookup in {projection}: {_message(e.value)}") from None
    return None if raw is None else json.loads(raw)


def setting(name: str, default: Optional[str] = None) -> Optional[str]:
    """The setting ``name`` from ``plugins.<name>.settings`` in refract.yaml, as text."""
    value = _settings.get(name)
    return default if value is None else value


_LEVELS = {"trace": _log.Level.TRACE, "debug": _log.Level.DEBUG, "info": _log.Level.INFO,
           "warn": _log.Level.WARN, "error": _log.Level.ERROR}


def log(level: str, message: str) -> None:
    """Send ``message`` to the runtime's log under the plugin's name (level: trace … error)."""
    _log.log(_LEVELS[level], message)


def _failure(error: BaseException) -> Err:
    if isinstance(error, Transient):
        return Err(types.Failure_Transient(str(error)))
    if isinstance(error, Rejected):
        return Err(types.Failure_Rejected(str(error)))
    # An exception the plugin did not mean: where it came from, for the dead letter.
    where = "".join(traceback.format_tb(error.__traceback__)).rstrip()
    return Err(types.Failure_Rejected(f"{type(error).__name__}: {error}\nTraceback (most recent call last):\n{where}"))


class Projection:
    """Base of a projection's ``WitWorld``: set ``MANIFEST`` (and ``INDEXES``), and
    implement ``apply(event)`` or override ``handle_batch(events)``."""

    MANIFEST: Manifest
    INDEXES: List[IndexMapping] = []

    def manifest(self) -> "types.Manifest":
        return self.MANIFEST.to_wit()

    def indexes(self) -> List["types.IndexMapping"]:
        return [mapping.to_wit() for mapping in self.INDEXES]

    def keyed_tables(self) -> List["types.KeyedTable"]:
        return self.MANIFEST.keyed_to_wit()

    def apply(self, event: "types.Event") -> None:
        raise NotImplementedError("implement apply(event) or handle_batch(events)")

    def handle_batch(self, events: List["types.Event"]) -> None:
        for event in events:
            self.apply(event)

    def handle(self, events: List["types.Event"]) -> None:
        try:
            self.handle_batch(events)
        except Exception as e:  # every failure is the batch's, never a trap
            raise _failure(e) from None


class Enricher:
    """Base of an enricher's ``WitWorld``: set ``MANIFEST`` and implement
    ``enrich_one(event)`` returning its outputs (a list of :class:`NewEvent`)."""

    MANIFEST: Manifest

    def manifest(self) -> "types.Manifest":
        return self.MANIFEST.to_wit()

    def enrich_one(self, event: "types.Event") -> List[NewEvent]:
        raise NotImplementedError("implement enrich_one(event) or enrich_batch(events)")

    def enrich_batch(self, events: List["types.Event"]) -> List[NewEvent]:
        out: List[NewEvent] = []
        for event in events:
            out.extend(self.enrich_one(event))
        return out

    def enrich(self, events: List["types.Event"]) -> List["_emit.Outgoing"]:
        try:
            return [output.to_wit() for output in self.enrich_batch(events)]
        except Exception as e:
            raise _failure(e) from None
