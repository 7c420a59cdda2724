"""Typed wire messages: field names on the wire."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from labctl.core.errors import ProtocolError
from labctl.core.wire import Message, wire_name


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
