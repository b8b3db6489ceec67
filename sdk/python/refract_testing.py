"""Run Python plugins natively under CPython, for their unit tests.

Import this module before the plugin: it installs in-memory stand-ins for
the modules componentize-py generates (``wit_world.imports.*`` and
``componentize_py_types``), so the SDK and the plugin run unchanged::

    import refract_testing as host
    from app import WitWorld

    host.reset()
    WitWorld().handle([host.event("orders", "OrderPlaced", {"orderId": "o-1"})])
    assert host.memory.get("counts", "OrderPlaced") == {"n": 1, "last": 0}
"""

import json
import sys
import types as _modules
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class Ok:
    value: Any


@dataclass(frozen=True)
class Err(Exception):
    value: Any


@dataclass
class Some:
    value: Any


def _variant(name: str):
    return dataclass(type(name, (), {"__annotations__": {"value": str}}))


class Memory:
    """The host's state: tables, indexes, emitted events, logs, settings, lookups."""

    def __init__(self):
        self.tables: Dict[str, Dict[str, bytes]] = {}
        self.indexes: Dict[str, Dict[str, bytes]] = {}
        self.emitted: List[Tuple[str, Any]] = []
        self.logs: List[Tuple[Any, str]] = []
        self.settings: Dict[str, str] = {}
        #: projection → table → key → JSON value, for lookups.
        self.lookups: Dict[str, Dict[str, Dict[str, Any]]] = {}

    def get(self, table: str, key: str) -> Any:
        raw = self.tables.get(table, {}).get(key)
        return None if raw is None else json.loads(raw)

    def document(self, index: str, id: str) -> Any:
        raw = self.indexes.get(index, {}).get(id)
        return None if raw is None else json.loads(raw)


memory = Memory()


def reset() -> None:
    """Forget everything the plugin stored."""
    memory.__init__()


def _install() -> None:
    runtime_types = _modules.ModuleType("componentize_py_types")
    runtime_types.Ok, runtime_types.Err, runtime_types.Some, runtime_types.Result = Ok, Err, Some, Any
    sys.modules["componentize_py_types"] = runtime_types

    types = _modules.ModuleType("wit_world.imports.types")

    @dataclass
    class Event:
        stream: str
        partition: int
        offset: int
        key: Optional[str]
        event_type: str
        time: int
        headers: List[Tuple[str, str]]
        content_type: str
        data: bytes

    @dataclass
    class Subscription:
        stream: str
        event_types: List[str]

    class FieldType(Enum):
        KEYWORD = 0
        TEXT = 1
        I64 = 2
        F64 = 3
        DATE = 4
        BOOL = 5

    @dataclass
    class FieldMapping:
        name: str
        type: FieldType
        stored: bool
        fast: bool

    @dataclass
    class IndexMapping:
        name: str
        fields: List[FieldMapping]

    @dataclass
    class Manifest:
        name: str
        version: str
        schema_version: int
        subscriptions: List[Subscription]
        tables: List[str]

    @dataclass
    class KeyedTable:
        table: str
        separator: Optional[str]

    for cls in (Event, Subscription, FieldType, FieldMapping, IndexMapping, Manifest, KeyedTable):
        setattr(types, cls.__name__, cls)
    types.Failure_Rejected = _variant("Failure_Rejected")
    types.Failure_Transient = _variant("Failure_Transient")

    kv = _modules.ModuleType("wit_world.imports.kv")

    @dataclass
    class Entry:
        key: str
        value: bytes

    kv.Entry = Entry
    kv.get = lambda table, key: memory.tables.get(table, {}).get(key)
    kv.put = lambda table, key, value: memory.tables.setdefault(table, {}).__setitem__(key, value)
    kv.delete = lambda table, key: memory.tables.get(table, {}).pop(key, None) and None
    kv.scan = lambda table, prefix, start_after, limit: [
        Entry(k, v)
        for k, v in sorted(memory.tables.get(table, {}).items())
        if k.startswith(prefix) and (start_after is None or k > start_after)
    ][:limit]

    search = _modules.ModuleType("wit_world.imports.search")
    search.upsert = lambda index, id, doc: memory.indexes.setdefault(index, {}).__setitem__(id, doc)
    search.delete = lambda index, id: memory.indexes.get(index, {}).pop(id, None) and None

    emit = _modules.ModuleType("wit_world.imports.emit")

    @dataclass
    class Outgoing:
        event_type: str
        key: Optional[str]
        time: int
        headers: List[Tuple[str, str]]
        data: bytes

    emit.Outgoing = Outgoing
    emit.emit = lambda stream, event: memory.emitted.append((stream, event))

    lookup = _modules.ModuleType("wit_world.imports.lookup")
    lookup.LookupError_UnknownProjection = _variant("LookupError_UnknownProjection")
    lookup.LookupError_UnknownTable = _variant("LookupError_UnknownTable")

    def lookup_get(projection: str, table: str, key: str) -> Optional[bytes]:
        if projection not in memory.lookups:
            raise Err(lookup.LookupError_UnknownProjection(f"no projection {projection}"))
        if table not in memory.lookups[projection]:
            raise Err(lookup.LookupError_UnknownTable(f"{projection} has no table {table}"))
        value = memory.lookups[projection][table].get(key)
        return None if value is None else json.dumps(value).encode()

    lookup.get = lookup_get

    settings = _modules.ModuleType("wit_world.imports.settings")
    settings.get = lambda name: memory.settings.get(name)

    log = _modules.ModuleType("wit_world.imports.log")

    class Level(Enum):
        TRACE = 0
        DEBUG = 1
        INFO = 2
        WARN = 3
        ERROR = 4

    log.Level = Level
    log.log = lambda level, message: memory.logs.append((level, message))

    imports = _modules.ModuleType("wit_world.imports")
    world = _modules.ModuleType("wit_world")
    world.imports = imports
    sys.modules["wit_world"] = world
    sys.modules["wit_world.imports"] = imports
    for name, module in [("types", types), ("kv", kv), ("search", search), ("emit", emit),
                         ("lookup", lookup), ("settings", settings), ("log", log)]:
        setattr(imports, name, module)
        sys.modules[f"wit_world.imports.{name}"] = module


_install()
Err = sys.modules["componentize_py_types"].Err


def event(stream: str, event_type: str, data: Any, key: Optional[str] = None, time: int = 0,
          partition: int = 0, offset: int = 0, headers: Optional[List[Tuple[str, str]]] = None):
    """An event as the host delivers it; ``data`` is JSON-encoded unless it is bytes."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    types = sys.modules["wit_world.imports.types"]
    return types.Event(stream, partition, offset, key, event_type, time, headers or [], "application/json", raw)
