"""The switchover criterion of a replication, as a predicate a user writes and a test can
check: ``predicted_outage <= 2s and passes >= 2``. After each pass the replication
evaluates it over what that pass saw (:class:`PassView`); when it holds, the source is
quiesced and the final pass runs. Each evaluation says why it held or not, clause by
clause (:class:`Verdict`), and that is recorded with the pass.

The language: comparisons (``<= < >= > == !=``) of arithmetic (``+ - * /``, parentheses)
over the names of :data:`NAMES` and numbers with units, joined by ``and``, ``or``, ``not``.
Units: ``ms s min h`` (time), ``B KiB MiB GiB TiB`` and ``K M G T`` (bytes, powers of
1024, as labctl's sizes), ``KB MB GB`` (powers of 1000), ``B/s KiB/s MiB/s GiB/s`` and
``kbit/s Mbit/s Gbit/s`` (rates), ``%`` (a fraction). Every expression is checked for
dimensions before anything runs: ``predicted_outage <= 100MiB`` (time against bytes) is
refused, as is a name that does not exist (with the nearest one), in one line naming the
column. Nothing is ever passed to Python's ``eval``.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labctl.core.errors import LabError


@dataclass(frozen=True)
class Dim:
    """A dimension as powers of bytes and seconds (bytes/s is (1, -1)); ``boolean`` for
    what ``and``/``or``/``not`` and comparisons give."""

    byte: int = 0
    second: int = 0
    boolean: bool = False

    def __mul__(self, other: Dim) -> Dim:
        return Dim(self.byte + other.byte, self.second + other.second)

    def __truediv__(self, other: Dim) -> Dim:
        return Dim(self.byte - other.byte, self.second - other.second)

    def __str__(self) -> str:
        if self.boolean:
            return "a truth value"
        return _DIM_WORDS.get((self.byte, self.second), f"bytes^{self.byte} s^{self.second}")


NUMBER = Dim()
BYTES = Dim(byte=1)
SECONDS = Dim(second=1)
RATE = Dim(byte=1, second=-1)
BOOL = Dim(boolean=True)
_DIM_WORDS = {(0, 0): "a plain number", (1, 0): "bytes", (0, 1): "seconds",
              (1, -1): "bytes per second", (0, -1): "per second"}

#: unit -> (factor to the base unit, dimension); longest first when matching
UNITS: dict[str, tuple[float, Dim]] = {
    "ms": (1e-3, SECONDS), "s": (1.0, SECONDS), "min": (60.0, SECONDS), "h": (3600.0, SECONDS),
    "B": (1.0, BYTES), "KiB": (1024.0, BYTES), "MiB": (1024.0 ** 2, BYTES),
    "GiB": (1024.0 ** 3, BYTES), "TiB": (1024.0 ** 4, BYTES),
    "K": (1024.0, BYTES), "M": (1024.0 ** 2, BYTES), "G": (1024.0 ** 3, BYTES),
    "T": (1024.0 ** 4, BYTES),
    "KB": (1e3, BYTES), "MB": (1e6, BYTES), "GB": (1e9, BYTES),
    "B/s": (1.0, RATE), "KiB/s": (1024.0, RATE), "MiB/s": (1024.0 ** 2, RATE),
    "GiB/s": (1024.0 ** 3, RATE),
    "kbit/s": (1e3 / 8, RATE), "Mbit/s": (1e6 / 8, RATE), "Gbit/s": (1e9 / 8, RATE),
    "%": (0.01, NUMBER),
}

#: the names a criterion may use: what one pass saw (:class:`PassView`), with dimensions
NAMES: dict[str, tuple[Dim, str]] = {
    "passes": (NUMBER, "passes completed (the first copies every allocated block)"),
    "remaining": (BYTES, "changed bytes not yet on the destination"),
    "dirty_rate": (RATE, "bytes the source changed per second during the last pass"),
    "link_rate": (RATE, "bytes per second the last pass moved to the destination"),
    "predicted_outage": (SECONDS, "the final pass's predicted time: remaining over the "
                                  "link rate, plus the quiesce and verification overhead"),
    "last_pass": (SECONDS, "how long the last pass took"),
    "elapsed": (SECONDS, "time since the replication began"),
    "free_bytes": (BYTES, "bytes free on the source's file system (where its application "
                          "writes) when the pass ended: 'predicted_outage <= 2s or "
                          "free_bytes < 64MiB' cuts over before the disk fills"),
    "approved": (NUMBER, "1 once an operator said the cutover may go (labctl replication "
                         "approve ID), else 0: 'approved == 1 and predicted_outage <= 2s'"),
}


class SwitchoverError(LabError):
    """A criterion that cannot be read or makes no sense (dimensions, names)."""


@dataclass(frozen=True)
class PassView:
    """What one completed pass saw: the values of :data:`NAMES` (SI base units: bytes,
    seconds, bytes per second)."""

    passes: int
    remaining: float
    dirty_rate: float
    link_rate: float
    predicted_outage: float
    last_pass: float
    elapsed: float
    approved: float = 0.0
    #: unknown (the source's disk not mounted in its guest) reads as infinite: a
    #: ``free_bytes < ...`` clause never holds on no evidence
    free_bytes: float = math.inf

    def value(self, name: str) -> float:
        return float(getattr(self, name))


def predicted_outage(remaining: float, link_rate: float, overhead_s: float) -> float:
    """The final pass's time: the changed bytes over the link's rate, plus the fixed cost of
    quiescing the source and verifying both sides (``inf`` when nothing moved yet)."""
    return overhead_s + (remaining / link_rate if link_rate > 0 else math.inf)


# --- reading an expression ----------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    (?P<unit>[A-Za-z%]+(?:/s)?)?
  | (?P<op><=|>=|==|!=|<|>|\+|-|\*|/|\(|\))
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
""", re.VERBOSE)

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
    "==": operator.eq, "!=": operator.ne}


@dataclass(frozen=True)
class _Tok:
    kind: str  # number, name, op, word (and/or/not), end
    text: str
    col: int
    value: float = 0.0
    dim: Dim = NUMBER


@dataclass(frozen=True)
class Node:
    """One node of a read criterion: its source text (for the verdict), its dimension,
    and how to compute it from a pass."""

    text: str
    dim: Dim
    compute: Callable[[PassView, list[Clause]], Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Clause:
    """One comparison as it was evaluated: its text, both sides in words, and whether it
    held."""

    text: str
    left: str
    right: str
    holds: bool


@dataclass(frozen=True)
class Verdict:
    """A criterion evaluated over one pass: whether it holds, and each comparison's part."""

    holds: bool
    clauses: list[Clause]

    def why(self) -> str:
        """One line: each clause, its values and whether it held."""
        return "; ".join(f"{c.text}: {c.left} vs {c.right}: {'yes' if c.holds else 'no'}"
                         for c in self.clauses)


@dataclass(frozen=True)
class Criterion:
    """A read, checked criterion: evaluate it with :meth:`over`."""

    text: str
    root: Node

    def over(self, view: PassView) -> Verdict:
        clauses: list[Clause] = []
        holds = bool(self.root.compute(view, clauses))
        return Verdict(holds=holds, clauses=clauses)


def parse(text: str, where: str = "switchover") -> Criterion:
    """Read and check criterion ``text``; SwitchoverError naming the column otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise SwitchoverError(f"{where}: an empty criterion (e.g. 'predicted_outage <= 2s "
                              "and passes >= 2')", criterion=text)
    if len(text) > 1000:
        raise SwitchoverError(f"{where}: a criterion of more than 1000 characters",
                              criterion=text[:80])
    reader = _Reader(text, where)
    root = reader.expression()
    if reader.peek().kind != "end":
        tok = reader.peek()
        raise reader.error(tok, f"unexpected {tok.text!r}")
    if not root.dim.boolean:
        raise SwitchoverError(f"{where}: {text!r} is {root.dim}, not a condition (compare it: "
                              "e.g. predicted_outage <= 2s)", criterion=text)
    return Criterion(text=text, root=root)


class _Reader:
    """Recursive descent over the tokens, building :class:`Node` s with their dimensions."""

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        self.toks = self._tokens()
        self.i = 0

    def error(self, tok: _Tok, problem: str) -> SwitchoverError:
        return SwitchoverError(f"{self.where}: column {tok.col + 1}: {problem} in {self.text!r}",
                               criterion=self.text, column=tok.col + 1)

    def _tokens(self) -> list[_Tok]:
        out: list[_Tok] = []
        pos = 0
        while pos < len(self.text):
            m = _TOKEN.match(self.text, pos)
            if m is None:
                raise self.error(_Tok("?", self.text[pos], pos),
                                 f"{self.text[pos]!r} is no part of a criterion")
            kind = m.lastgroup
            col = pos
            pos = m.end()
            if kind == "space":
                continue
            if m.group("number") is not None:
                out.append(self._number(m, col))
            elif kind == "op":
                out.append(_Tok("op", m.group("op"), col))
            else:
                word = m.group("name")
                out.append(_Tok("word" if word in ("and", "or", "not") else "name", word, col))
        out.append(_Tok("end", "the end", len(self.text)))
        return out

    def _number(self, m: re.Match[str], col: int) -> _Tok:
        value = float(m.group("number"))
        unit = m.group("unit")
        if unit is None:
            return _Tok("number", m.group(0), col, value, NUMBER)
        if unit not in UNITS:
            near = difflib.get_close_matches(unit, UNITS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise self.error(_Tok("number", unit, col),
                             f"unknown unit {unit!r}{hint}; units: {', '.join(UNITS)}")
        factor, dim = UNITS[unit]
        return _Tok("number", m.group(0), col, value * factor, dim)

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def _span(self, start: _Tok) -> str:
        end = self.toks[self.i - 1]
        return self.text[start.col:end.col + len(end.text)].strip()

    def expression(self) -> Node:
        return self._or()

    def _logic(self, word: str, below: Callable[[], Node],
               join: Callable[[list[bool]], bool]) -> Node:
        start = self.peek()
        parts = [below()]
        while self.peek().kind == "word" and self.peek().text == word:
            tok = self.take()
            parts.append(below())
            for p in parts:
                if not p.dim.boolean:
                    raise self.error(tok, f"'{word}' joins conditions, but {p.text!r} is {p.dim}")
        if len(parts) == 1:
            return parts[0]

        def compute(view: PassView, clauses: list[Clause]) -> bool:
            # every part is evaluated (no short cut): the verdict shows each clause
            return join([bool(p.compute(view, clauses)) for p in parts])

        return Node(self._span(start), BOOL, compute)

    def _or(self) -> Node:
        return self._logic("or", self._and, any)

    def _and(self) -> Node:
        return self._logic("and", self._not, all)

    def _not(self) -> Node:
        if self.peek().kind == "word" and self.peek().text == "not":
            tok = self.take()
            inner = self._not()
            if not inner.dim.boolean:
                raise self.error(tok, f"'not' takes a condition, but {inner.text!r} is {inner.dim}")
            return Node(f"not {inner.text}", BOOL, lambda v, c: not inner.compute(v, c))
        return self._compare()

    def _compare(self) -> Node:
        start = self.peek()
        left = self._sum()
        if not (self.peek().kind == "op" and self.peek().text in _COMPARE):
            return left
        tok = self.take()
        right = self._sum()
        if left.dim.boolean or right.dim.boolean or left.dim != right.dim:
            raise self.error(tok, f"{left.text!r} ({left.dim}) compared with {right.text!r} "
                                  f"({right.dim})")
        op = _COMPARE[tok.text]
        text = self._span(start)
        dim = left.dim

        def compute(view: PassView, clauses: list[Clause]) -> bool:
            a, b = float(left.compute(view, clauses)), float(right.compute(view, clauses))
            holds = bool(op(a, b))
            clauses.append(Clause(text, _words(a, dim), _words(b, dim), holds))
            return holds

        return Node(text, BOOL, compute)

    def _arith(self, ops: str, below: Callable[[], Node]) -> Node:
        start = self.peek()
        node = below()
        while self.peek().kind == "op" and self.peek().text in ops:
            tok = self.take()
            right = below()
            node = self._combine(start, tok, node, right)
        return node

    def _combine(self, start: _Tok, tok: _Tok, a: Node, b: Node) -> Node:
        for side in (a, b):
            if side.dim.boolean:
                raise self.error(tok, f"{side.text!r} is a condition: no arithmetic on it")
        if tok.text in "+-":
            if a.dim != b.dim:
                raise self.error(tok, f"{a.text!r} ({a.dim}) {tok.text} {b.text!r} ({b.dim})")
            sign = 1.0 if tok.text == "+" else -1.0
            return Node(self._span(start), a.dim,
                        lambda v, c: a.compute(v, c) + sign * b.compute(v, c))
        if tok.text == "*":
            return Node(self._span(start), a.dim * b.dim,
                        lambda v, c: a.compute(v, c) * b.compute(v, c))

        def divide(view: PassView, clauses: list[Clause]) -> float:
            den = float(b.compute(view, clauses))
            num = float(a.compute(view, clauses))
            return num / den if den else (math.inf if num > 0 else 0.0)

        return Node(self._span(start), a.dim / b.dim, divide)

    def _sum(self) -> Node:
        return self._arith("+-", self._term)

    def _term(self) -> Node:
        return self._arith("*/", self._unary)

    def _unary(self) -> Node:
        if self.peek().kind == "op" and self.peek().text == "-":
            self.take()
            inner = self._unary()
            if inner.dim.boolean:
                raise self.error(self.peek(), f"{inner.text!r} is a condition: it has no sign")
            return Node(f"-{inner.text}", inner.dim, lambda v, c: -inner.compute(v, c))
        return self._atom()

    def _atom(self) -> Node:
        tok = self.take()
        if tok.kind == "number":
            value = tok.value
            return Node(tok.text, tok.dim, lambda v, c: value)
        if tok.kind == "name":
            if tok.text not in NAMES:
                near = difflib.get_close_matches(tok.text, NAMES, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise self.error(tok, f"unknown name {tok.text!r} ({hint}names: "
                                      f"{', '.join(NAMES)})")
            name = tok.text
            return Node(name, NAMES[name][0], lambda v, c: v.value(name))
        if tok.kind == "op" and tok.text == "(":
            start = tok
            inner = self.expression()
            close = self.take()
            if close.text != ")":
                raise self.error(close, f"a '(' at column {start.col + 1} is not closed")
            return Node(f"({inner.text})", inner.dim, inner.compute)
        raise self.error(tok, f"expected a name, a number or '(', got {tok.text!r}")


def _words(value: float, dim: Dim) -> str:
    """A value as people read it, in the unit of its dimension."""
    if math.isinf(value):
        return "infinite"
    if dim == SECONDS:
        return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if dim == BYTES:
        return f"{value / 1024 ** 2:.1f} MiB"
    if dim == RATE:
        return f"{value * 8 / 1e6:.1f} Mbit/s"
    return f"{value:g}"


# --- a policy: the criterion with its limits ------------------------------------------------

@dataclass(frozen=True)
class SwitchoverPolicy:
    """When to switch over (``when``), and when to give up: after ``deadline_s`` seconds or
    ``max_passes`` passes without the criterion holding (the source is left untouched)."""

    when: Criterion
    deadline_s: float = 3600.0
    max_passes: int = 30

    def decide(self, view: PassView) -> tuple[str, Verdict]:
        """``switch`` (the criterion holds), ``give_up`` (a limit is reached first) or
        ``continue``, with the verdict that says why."""
        verdict = self.when.over(view)
        if verdict.holds:
            return "switch", verdict
        if view.elapsed >= self.deadline_s or view.passes >= self.max_passes:
            return "give_up", verdict
        return "continue", verdict


DEFAULT_WHEN = "predicted_outage <= 2s and passes >= 2"


def _positive(text: object, where: str, dim: Dim, what: str, example: str) -> float:
    node = parse_value(str(text), where)
    if node.dim != dim:
        raise SwitchoverError(f"{where}: {text!r} is {node.dim}, not a {what} (e.g. {example})",
                              value=str(text))
    value = float(node.compute(_NO_VIEW, []))
    if not value > 0:
        raise SwitchoverError(f"{where}: {text!r} is not a positive {what}", value=str(text))
    return value


def duration(text: object, where: str) -> float:
    """``30min``, ``90s``, ``1.5h`` as seconds; SwitchoverError for anything else."""
    return _positive(text, where, SECONDS, "time", "30min")


def rate(text: object, where: str) -> float:
    """``50Mbit/s``, ``10MiB/s`` as bytes per second; SwitchoverError for anything else."""
    return _positive(text, where, RATE, "rate", "50Mbit/s")


def parse_value(text: str, where: str) -> Node:
    """An arithmetic expression of constants (no names, no comparison)."""
    reader = _Reader(text, where)
    node = reader._sum()
    if reader.peek().kind != "end":
        tok = reader.peek()
        raise reader.error(tok, f"unexpected {tok.text!r}")
    if any(t.kind == "name" for t in reader.toks):
        raise SwitchoverError(f"{where}: {text!r} must be a constant (like 30min)", value=text)
    return node


_NO_VIEW = PassView(passes=0, remaining=0.0, dirty_rate=0.0, link_rate=0.0,
                    predicted_outage=0.0, last_pass=0.0, elapsed=0.0)


def policy_from(data: object, where: str = "switchover") -> SwitchoverPolicy:
    """A policy from a criterion string, or a mapping ``{when, deadline, max_passes}`` (a
    YAML policy file's content); every problem names its key."""
    if isinstance(data, str):
        return SwitchoverPolicy(when=parse(data, where))
    if not isinstance(data, dict):
        raise SwitchoverError(f"{where}: a criterion or a mapping of when, deadline, "
                              "max_passes", value=repr(data)[:80])
    unknown = sorted(set(map(str, data)) - {"when", "deadline", "max_passes"})
    if unknown:
        near = difflib.get_close_matches(unknown[0], ["when", "deadline", "max_passes"], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SwitchoverError(f"{where}: unknown key {unknown[0]!r}{hint}", key=unknown[0])
    when = parse(str(data.get("when", DEFAULT_WHEN)), f"{where}.when")
    deadline = duration(data["deadline"], f"{where}.deadline") if "deadline" in data else 3600.0
    passes = data.get("max_passes", 30)
    if isinstance(passes, bool) or not isinstance(passes, int) or not 1 <= passes <= 1000:
        raise SwitchoverError(f"{where}.max_passes: {passes!r} is not a whole number from 1 "
                              "to 1000", value=repr(passes))
    return SwitchoverPolicy(when=when, deadline_s=deadline, max_passes=passes)
