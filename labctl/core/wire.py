"""Typed messages between the controller and its agents. Standard library only.

A message is a frozen dataclass deriving from :class:`Message`. Its fields may be
``str``, ``int``, ``float``, ``bool``, ``None``, ``Literal[...]``, another message,
``pathlib.Path`` (a string on the wire), :data:`WallTime` (Unix time in the program, an
ISO 8601 string on the wire), ``list[X]``, ``tuple[X, ...]`` (a list on the wire),
``dict[str, X]``, unions of those, or
:data:`Json` for data that is passed through as it came (QEMU's own answers, evidence). Decoding checks every
field against its annotation: an unknown field, a missing one or a wrong type is a
:class:`~labctl.core.errors.ProtocolError` naming the message and the field. A field
named after a Python keyword plus ``_`` (``pass_``) is the keyword on the wire (``pass``).
:func:`json_schema` describes a message's wire form as a JSON Schema (draft 2020-12), for
records printed as a documented contract (``--json``).

A :class:`Method` binds an RPC method name to its request and reply types; both sides
use the same object::

    # protocol module (imports only labctl.core)
    @dataclass(frozen=True)
    class PingReply(Message):
        host: str
        pid: int

    PING = Method("ping", Empty, PingReply)

    # agent side
    server = RpcServer(secret, handlers(PING.serve(agent.ping), ...))

    # controller side
    reply = await PING.call(client)          # -> PingReply, checked
"""

from __future__ import annotations

import dataclasses
import inspect
import keyword
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, NewType, TypeVar, Union

from labctl.core.errors import ProtocolError

if TYPE_CHECKING:
    from labctl.core.rpc import Handler, RpcClient

#: JSON as it came: QEMU's answers, a remote error's evidence. Not checked beyond being JSON.
Json = Any

M = TypeVar("M", bound="Message")
Req = TypeVar("Req", bound="Message")
Rep = TypeVar("Rep", bound="Message")


#: a wall-clock time: Unix time (``time.time()``) in the program, so it can be compared and
#: subtracted; ISO 8601 in UTC to the millisecond on the wire and in every ``--json`` record
#: (``2026-12-01T19:24:39.123+00:00``); decoding takes exactly that form (a reader of the
#: inventory, which keeps Unix time, writes it with :func:`iso_time` first).
WallTime = NewType("WallTime", float)
#: the form of a WallTime on the wire (what :func:`iso_time` writes; any offset, Z, or none)
WALL_TIME_PATTERN = (r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
                     r"(Z|[+-][0-9]{2}:[0-9]{2})?$")


def iso_time(t: float) -> str:
    """Unix time ``t`` as a :data:`WallTime` is written."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


class Message:
    """Base of every typed message (subclasses are frozen dataclasses)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @classmethod
    def from_wire(cls: type[M], data: object, where: str = "") -> M:
        """Decode and check ``data`` (a JSON object); ProtocolError on any mismatch."""
        return _decode_message(cls, data, where or cls.__name__)

    def to_wire(self) -> dict[str, Json]:
        """The JSON form (fields by name; nested messages as objects)."""
        out: dict[str, Json] = {}
        times = _wall_times(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type, unused-ignore]
            value = getattr(self, f.name)
            if f.name in times and isinstance(value, int | float) and not isinstance(value, bool):
                out[wire_name(f.name)] = iso_time(float(value))
            else:
                out[wire_name(f.name)] = _encode(value)
        return out

    def replace(self: M, **changes: Any) -> M:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var, unused-ignore]


@dataclasses.dataclass(frozen=True)
class Empty(Message):
    """A request or reply without fields."""


@dataclasses.dataclass(frozen=True)
class Method(Generic[Req, Rep]):
    """One RPC method: its name, request and reply types."""

    name: str
    request: type[Req]
    reply: type[Rep]

    async def call(self, client: RpcClient, req: Req | None = None,
                   timeout: float = 60.0) -> Rep:
        """Call the method on ``client``'s agent; the reply is decoded and checked."""
        params = (req if req is not None else self.request()).to_wire()
        raw = await client.request(self.name, params, timeout=timeout)
        return self.reply.from_wire(raw, f"{self.name} reply from {client.peer}")

    def serve(self, fn: Callable[[Req], Awaitable[Rep]]) -> tuple[str, Handler]:
        """A server-side handler entry: decodes the request, encodes the reply."""
        async def handler(**params: Json) -> Json:
            req = self.request.from_wire(params, f"{self.name} request")
            rep = await fn(req)
            if not isinstance(rep, self.reply):
                raise ProtocolError(f"{self.name}: the handler answered {type(rep).__name__}, "
                                    f"not {self.reply.__name__}")
            return rep.to_wire()

        return self.name, handler


def handlers(*entries: tuple[str, Handler]) -> dict[str, Handler]:
    """A handler table from :meth:`Method.serve` entries; a name given twice is a bug."""
    table: dict[str, Handler] = {}
    for name, fn in entries:
        if name in table:
            raise ValueError(f"RPC method {name} registered twice")
        table[name] = fn
    return table


def methods(module_globals: Iterable[object]) -> list[Method[Any, Any]]:
    """Every Method in a protocol module (``methods(vars(module).values())``)."""
    return [m for m in module_globals if isinstance(m, Method)]


# --- encoding ------------------------------------------------------------------------------

def wire_name(field_name: str) -> str:
    """A field's key on the wire: ``pass_`` (a keyword, so not a Python name) is ``pass``."""
    if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]):
        return field_name[:-1]
    return field_name


def _encode(value: Any) -> Json:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


# --- decoding ------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_TIMES: dict[type, frozenset[str]] = {}


def _wall_times(cls: type) -> frozenset[str]:
    """The fields of ``cls`` declared :data:`WallTime` (or ``WallTime | None``)."""
    names = _TIMES.get(cls)
    if names is None:
        names = _TIMES[cls] = frozenset(
            name for name, tp in _hints(cls).items()
            if tp is WallTime or (typing.get_origin(tp) in (Union, types.UnionType)
                                  and WallTime in typing.get_args(tp)))
    return names


def _decode_message(cls: type[M], data: object, where: str) -> M:
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected an object, got {_kind(data)}", where=where)
    fields = {wire_name(f.name): f
              for f in dataclasses.fields(cls)}  # type: ignore[arg-type, unused-ignore]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ProtocolError(f"{where}: unknown field {unknown[0]!r} (known: "
                            f"{', '.join(fields) or 'none'})", where=where, field=unknown[0])
    hints = _hints(cls)
    kw: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{where}: missing field {name!r}", where=where, field=name)
            continue
        kw[f.name] = _decode(hints[f.name], data[name], f"{where}.{name}")
    try:
        return cls(**kw)
    except (TypeError, ValueError) as exc:  # a message's own __post_init__ checks
        raise ProtocolError(f"{where}: {exc}", where=where) from exc


def _decode(tp: Any, value: object, where: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            try:
                return _decode(alt, value, where)
            except ProtocolError as exc:
                errors.append(exc.message)
        raise ProtocolError(f"{where}: {_kind(value)} fits none of "
                            f"{' | '.join(_name(a) for a in typing.get_args(tp))}", where=where,
                            alternatives=errors)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ProtocolError(f"{where}: {value!r} is not one of "
                            f"{', '.join(repr(a) for a in typing.get_args(tp))}", where=where)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {_kind(value)}", where=where)
        (item,) = typing.get_args(tp)
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple and len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is Ellipsis:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {_kind(value)}", where=where)
        item = typing.get_args(tp)[0]
        return tuple(_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an object, got {_kind(value)}", where=where)
        _, item = typing.get_args(tp)
        return {str(k): _decode(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise ProtocolError(f"{where}: expected null, got {_kind(value)}", where=where)
    if isinstance(tp, type) and issubclass(tp, Message):
        return _decode_message(tp, value, where)
    if tp is WallTime:
        if isinstance(value, str) and re.match(WALL_TIME_PATTERN, value):
            try:
                return WallTime(datetime.fromisoformat(value).timestamp())
            except ValueError:
                pass
        raise ProtocolError(f"{where}: expected an ISO 8601 time, got {_kind(value)}",
                            where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
    else:
        raise ProtocolError(f"{where}: a field of type {_name(tp)} cannot be decoded",
                            where=where)
    raise ProtocolError(f"{where}: expected {_name(tp)}, got {_kind(value)}", where=where)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


# --- JSON Schema ---------------------------------------------------------------------------

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_SCALARS: dict[Any, dict[str, Json]] = {
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    type(None): {"type": "null"},
    Path: {"type": "string", "minLength": 1},
}


def json_schema(cls: type[Message]) -> dict[str, Json]:
    """A JSON Schema (draft 2020-12) of the wire form of message ``cls``, from its annotations.

    It accepts what :meth:`Message.from_wire` accepts, field by field: an object with the
    message's fields (wire names), those without a default ``required``, no other key;
    ``Literal`` as ``enum``, ``Path`` as a non-empty string, unions as ``anyOf``,
    :data:`Json` as anything. Each nested message class is one entry of ``$defs`` (named by
    its class, qualified by its module where two reachable classes share a name), referred
    to by ``$ref``; ``cls`` itself is the root (``#``), so recursive messages are fine.
    ``title`` is the class name, ``description`` its docstring, ``default`` a field's
    default in wire form. Not expressed: a message's own ``__post_init__`` checks, and
    JSON Schema counts ``1.0`` as an integer where ``from_wire`` does not. A field type
    that :meth:`Message.from_wire` cannot decode is a TypeError.
    """
    found: list[type[Message]] = []
    _reachable(cls, found)
    nested = found[1:]
    refs: dict[type[Message], str] = {cls: "#"}
    short = [c.__name__ for c in nested]
    for c in nested:
        name = c.__name__ if short.count(c.__name__) == 1 else f"{c.__module__}.{c.__qualname__}"
        refs[c] = f"#/$defs/{name}"
    schema: dict[str, Json] = {"$schema": JSON_SCHEMA_DIALECT, **_object_schema(cls, refs)}
    if nested:
        schema["$defs"] = {refs[c].removeprefix("#/$defs/"): _object_schema(c, refs)
                           for c in nested}
    return schema


def _reachable(tp: Any, found: list[type[Message]]) -> None:
    """Every message class in type ``tp``, depth first in field order (each once)."""
    if isinstance(tp, type) and issubclass(tp, Message):
        if tp not in found:
            found.append(tp)
            hints = _hints(tp)
            for f in dataclasses.fields(tp):  # type: ignore[arg-type, unused-ignore]
                _reachable(hints[f.name], found)
        return
    if typing.get_origin(tp) is not Literal:
        for arg in typing.get_args(tp):
            _reachable(arg, found)


def _object_schema(cls: type[Message], refs: dict[type[Message], str]) -> dict[str, Json]:
    hints = _hints(cls)
    properties: dict[str, Json] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type, unused-ignore]
        name = wire_name(f.name)
        prop = _type_schema(hints[f.name], refs, f"{cls.__name__}.{name}")
        if f.default is not dataclasses.MISSING:
            prop = {**prop, "default": _encode(f.default)}
        elif f.default_factory is not dataclasses.MISSING:
            prop = {**prop, "default": _encode(f.default_factory())}
        else:
            required.append(name)
        properties[name] = prop
    out: dict[str, Json] = {"title": cls.__name__}
    description = _description(cls)
    if description:
        out["description"] = description
    out.update(type="object", properties=properties, required=required,
               additionalProperties=False)
    return out


def _type_schema(tp: Any, refs: dict[type[Message], str], where: str) -> dict[str, Json]:
    if tp is Any:
        return {}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_type_schema(a, refs, where) for a in args]}
    if origin is Literal:
        return {"enum": list(args)}
    if (origin is list and len(args) == 1) or (origin is tuple and len(args) == 2
                                               and args[1] is Ellipsis):
        return {"type": "array", "items": _type_schema(args[0], refs, where)}
    if origin is dict and len(args) == 2 and args[0] is str:
        return {"type": "object", "additionalProperties": _type_schema(args[1], refs, where)}
    if isinstance(tp, type) and issubclass(tp, Message):
        return {"$ref": refs[tp]}
    if tp is WallTime:
        return {"type": "string", "format": "date-time", "pattern": WALL_TIME_PATTERN}
    if tp in _SCALARS:
        return dict(_SCALARS[tp])
    raise TypeError(f"{where}: a field of type {_name(tp)} has no JSON form")


def _description(cls: type) -> str | None:
    """The class's own docstring (not the signature a dataclass makes up without one)."""
    doc = cls.__dict__.get("__doc__")
    if not isinstance(doc, str) or doc.startswith(f"{cls.__name__}("):
        return None
    return inspect.cleandoc(doc)
