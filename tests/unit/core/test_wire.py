"""Typed messages: what a peer sends is checked field by field; remote errors keep their class."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from labctl.core.errors import (
    LabError,
    MigrationError,
    ProtocolError,
    RemoteError,
    StorageNodeError,
    TopologyError,
    remote_error,
)
from labctl.core.wire import Empty, Json, Message, Method, handlers, wire_name


@dataclass(frozen=True)
class Inner(Message):
    counter: int
    age_s: float


@dataclass(frozen=True)
class Outer(Message):
    name: str
    kind: Literal["a", "b"]
    inner: Inner | None
    items: list[Inner] = field(default_factory=list)
    tags: dict[str, int] = field(default_factory=dict)
    path: Path | None = None
    raw: Json = None


def test_round_trip() -> None:
    msg = Outer("x", "a", Inner(1, 0.5), [Inner(2, 1.0)], {"t": 3}, Path("/a/b"), {"any": [1]})
    wire = msg.to_wire()
    assert wire["path"] == "/a/b" and wire["inner"] == {"counter": 1, "age_s": 0.5}
    assert Outer.from_wire(wire) == msg


@pytest.mark.parametrize(("data", "problem"), [
    ({"name": "x", "kind": "a", "inner": None, "extra": 1}, "unknown field 'extra'"),
    ({"name": "x", "kind": "a"}, "missing field 'inner'"),
    ({"name": 3, "kind": "a", "inner": None}, "Outer.name: expected str, got the number 3"),
    ({"name": "x", "kind": "c", "inner": None}, "Outer.kind: 'c' is not one of 'a', 'b'"),
    ({"name": "x", "kind": "a", "inner": {"counter": True, "age_s": 1}}, "fits none of"),
    ({"name": "x", "kind": "a", "inner": None, "items": [{"counter": 1}]},
     "Outer.items[0]: missing field 'age_s'"),
    ({"name": "x", "kind": "a", "inner": None, "tags": {"t": "3"}}, "Outer.tags.t: expected int"),
    ([1, 2], "Outer: expected an object, got a list"),
])
def test_mismatches_are_named(data: object, problem: str) -> None:
    with pytest.raises(ProtocolError) as info:
        Outer.from_wire(data)
    assert problem in info.value.message


def test_int_is_a_float_but_a_bool_is_not_an_int() -> None:
    assert Inner.from_wire({"counter": 1, "age_s": 2}).age_s == 2.0
    with pytest.raises(ProtocolError):
        Inner.from_wire({"counter": False, "age_s": 2})


@pytest.mark.asyncio
async def test_method_serve_checks_request_and_reply() -> None:
    async def good(req: Inner) -> Inner:
        return Inner(req.counter + 1, req.age_s)

    async def bad(req: Inner) -> Empty:
        return Empty()

    name, serve_good = Method("inc", Inner, Inner).serve(good)  # type: ignore[arg-type]
    assert name == "inc"
    assert await serve_good(counter=1, age_s=0.0) == {"counter": 2, "age_s": 0.0}
    with pytest.raises(ProtocolError, match="inc request: unknown field 'surprise'"):
        await serve_good(counter=1, age_s=0.0, surprise=1)
    _, serve_bad = Method("inc", Inner, Inner).serve(bad)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="answered Empty, not Inner"):
        await serve_bad(counter=1, age_s=0.0)
    with pytest.raises(ValueError, match="registered twice"):
        handlers(("inc", serve_good), ("inc", serve_bad))


def test_remote_errors_arrive_as_their_own_class() -> None:
    err = remote_error("h2: mig_prepare: no room", "MigrationError", peer="h2")
    assert isinstance(err, MigrationError) and isinstance(err, RemoteError)
    assert err.remote_type == "MigrationError" and err.evidence["peer"] == "h2"
    assert type(err) is type(remote_error("again", "MigrationError"))  # one class per type
    assert isinstance(remote_error("x", "StorageNodeError"), StorageNodeError)
    # a class whose constructor differs, or one labctl does not know: a plain RemoteError
    for kind in ("TopologyError", "KeyError"):
        plain = remote_error("x", kind)
        assert type(plain) is RemoteError and not isinstance(plain, TopologyError)
        assert isinstance(plain, LabError)


@dataclass(frozen=True)
class Pass(Message):
    pass_: int
    from_: str | None = None
    size_: int = 0  # not a keyword: the name as it is


def test_keyword_fields_drop_their_underscore_on_the_wire() -> None:
    assert wire_name("pass_") == "pass" and wire_name("size_") == "size_"
    msg = Pass(pass_=3, from_="a")
    assert msg.to_wire() == {"pass": 3, "from": "a", "size_": 0}
    assert Pass.from_wire({"pass": 3, "from": "a"}) == msg
    with pytest.raises(ProtocolError, match="missing field 'pass'"):
        Pass.from_wire({"from": "a"})
    with pytest.raises(ProtocolError, match="unknown field 'pass_'"):
        Pass.from_wire({"pass": 3, "pass_": 3})
    with pytest.raises(ProtocolError, match=r"Pass\.pass: expected int"):
        Pass.from_wire({"pass": "3"})
