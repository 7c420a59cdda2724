"""The WAN link's protocol: what a link between two sites is asked to be (netem's delay,
jitter, loss, rate, reorder, duplicate), how those values are written, and what the WAN
router's agent answers. Imports only ``labctl.core``: the router agent (inside the router
VM) uses it too.

Values are written as a user writes them (``20ms``, ``0.1%``, ``100mbit``) and parsed here,
once, for the topology file and ``labctl wan set`` alike. Every bound is explicit: a value
outside it is refused with one line naming the field and the bound.

Each direction of the link gets the same parameters on its router's egress, so a round
trip crosses the link twice: ``delay: 20ms`` gives a 40 ms RTT.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from labctl.core.errors import LabError
from labctl.core.wire import Empty, Message, Method

WAN_AGENT_PORT = 7800

#: ``gso``: the router keeps GSO/GRO on (fast: ~2 Gbit/s under TCG) and netem's loss drops
#: whole 64 KB super-packets, so ``loss`` hits far fewer wire packets than it says;
#: ``packet``: offloads off, so loss applies per wire packet as TCP theory assumes (but
#: the router forwards only ~350 Mbit/s under TCG)
LossMode = Literal["gso", "packet"]
LOSS_MODES: tuple[LossMode, ...] = ("gso", "packet")

MAX_DELAY_MS = 10_000.0
MAX_RATE_MBIT = 100_000.0
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s)?\s*$")
_PERCENT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%?\s*$")
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(kbit|mbit|gbit|bit)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_DURATION_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_ms(field: str, value: object, limit: float = MAX_DELAY_MS) -> float:
    """Milliseconds from ``20ms``, ``0.5s``, ``300us`` or a bare number of milliseconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise LabError(f"{field}: {value!r} is not a duration (like 20ms)", field=field)
    m = _DURATION.match(str(value))
    if m is None:
        raise LabError(f"{field}: {value!r} is not a duration (like 20ms, 0.5s; not negative)",
                       field=field)
    ms = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "ms"]
    if ms > limit:
        raise LabError(f"{field}: {value} is more than {limit:g} ms", field=field)
    return round(ms, 3)


def parse_percent(field: str, value: object) -> float:
    """A percentage from ``0.1%`` or ``0.1`` (0 to 100)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise LabError(f"{field}: {value!r} is not a percentage (like 0.1%)", field=field)
    m = _PERCENT.match(str(value))
    if m is None:
        raise LabError(f"{field}: {value!r} is not a percentage (like 0.1%; not negative)",
                       field=field)
    pct = float(m.group(1))
    if pct > 100:
        raise LabError(f"{field}: {value} is more than 100%", field=field)
    return round(pct, 4)


def parse_rate(field: str, value: object) -> float | None:
    """Mbit/s from ``100mbit``, ``1gbit``, ``500kbit`` or a bare number of Mbit/s; None for
    ``unlimited`` (or ``0``)."""
    if isinstance(value, str) and value.strip().lower() in ("unlimited", "none", "0"):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise LabError(f"{field}: {value!r} is not a rate (like 100mbit)", field=field)
    m = _RATE.match(str(value))
    if m is None:
        raise LabError(f"{field}: {value!r} is not a rate (like 100mbit, 1gbit, unlimited)",
                       field=field)
    mbit = float(m.group(1)) * _RATE_UNITS[(m.group(2) or "mbit").lower()]
    if mbit == 0:
        return None
    if mbit < 0.008:
        raise LabError(f"{field}: {value} is less than 8 kbit/s", field=field)
    if mbit > MAX_RATE_MBIT:
        raise LabError(f"{field}: {value} is more than {MAX_RATE_MBIT / 1000:g} gbit/s",
                       field=field)
    return round(mbit, 6)


@dataclass(frozen=True)
class LinkParams(Message):
    """What one direction of a WAN link is asked to do (the same in both directions)."""

    #: one-way delay in ms (the RTT across the link is twice this)
    delay_ms: float = 0.0
    #: +- jitter in ms around the delay (netem: jitter without a rate may reorder packets)
    jitter_ms: float = 0.0
    #: random loss, percent of packets (see ``loss_mode``)
    loss_pct: float = 0.0
    #: the rate in Mbit/s; None: as fast as the router forwards
    rate_mbit: float | None = None
    #: percent of packets sent at once, ahead of the delayed ones (needs a delay)
    reorder_pct: float = 0.0
    #: percent of packets duplicated
    duplicate_pct: float = 0.0
    loss_mode: LossMode = "gso"

    def __post_init__(self) -> None:
        """The bounds again (the agent gets these values off the wire): ValueError."""
        for name, value, top in (("delay_ms", self.delay_ms, MAX_DELAY_MS),
                                 ("jitter_ms", self.jitter_ms, MAX_DELAY_MS),
                                 ("loss_pct", self.loss_pct, 100.0),
                                 ("reorder_pct", self.reorder_pct, 100.0),
                                 ("duplicate_pct", self.duplicate_pct, 100.0)):
            if not 0 <= value <= top:
                raise ValueError(f"{name} {value!r} is outside 0..{top:g}")
        if self.rate_mbit is not None and not 0.008 <= self.rate_mbit <= MAX_RATE_MBIT:
            raise ValueError(f"rate_mbit {self.rate_mbit!r} is outside 0.008..{MAX_RATE_MBIT:g}")
        if self.jitter_ms > self.delay_ms:
            raise ValueError(f"jitter {self.jitter_ms:g} ms is larger than the delay "
                             f"{self.delay_ms:g} ms: netem cannot send a packet before it "
                             "arrived")
        if self.reorder_pct > 0 and self.delay_ms == 0:
            raise ValueError("reorder needs a delay: netem reorders by sending some packets "
                             "without it")
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode {self.loss_mode!r}: choose {' or '.join(LOSS_MODES)}")

    def netem_args(self) -> list[str]:
        """netem's arguments for these parameters (an argument list, for ``tc qdisc add ...
        netem``). The queue holds a few bandwidth-delay products, so a long fat link does
        not drop at the queue instead of where it was asked to."""
        args = ["limit", "100000"]
        if self.delay_ms > 0 or self.jitter_ms > 0:
            args += ["delay", f"{self.delay_ms:g}ms"]
            if self.jitter_ms > 0:
                args += [f"{self.jitter_ms:g}ms"]
        if self.reorder_pct > 0:
            args += ["reorder", f"{self.reorder_pct:g}%"]
        if self.loss_pct > 0:
            args += ["loss", "random", f"{self.loss_pct:g}%"]
        if self.duplicate_pct > 0:
            args += ["duplicate", f"{self.duplicate_pct:g}%"]
        if self.rate_mbit is not None:
            args += ["rate", f"{round(self.rate_mbit * 1000)}kbit"]
        return args

    def describe(self) -> str:
        """``delay 20ms jitter 5ms loss 0.1% rate 100mbit`` (what is not zero)."""
        out = [f"delay {self.delay_ms:g}ms"]
        if self.jitter_ms:
            out.append(f"jitter {self.jitter_ms:g}ms")
        if self.loss_pct:
            out.append(f"loss {self.loss_pct:g}% ({self.loss_mode})")
        out.append("rate unlimited" if self.rate_mbit is None else f"rate {self.rate_mbit:g}mbit")
        if self.reorder_pct:
            out.append(f"reorder {self.reorder_pct:g}%")
        if self.duplicate_pct:
            out.append(f"duplicate {self.duplicate_pct:g}%")
        return " ".join(out)


#: the words a topology's ``wan:`` entry and ``labctl wan set`` use for each parameter
PARAM_WORDS = ("delay", "jitter", "loss", "rate", "reorder", "duplicate", "loss_mode")


def _loss_mode(field: str, value: object) -> LossMode:
    if value == "gso" or value == "packet":
        return value
    raise LabError(f"{field}: {value!r}: choose {' or '.join(LOSS_MODES)}", field=field)


#: each word of :data:`PARAM_WORDS`: the field of :class:`LinkParams` it sets, and its parser
_PARSERS: dict[str, tuple[str, Callable[[str, object], object]]] = {
    "delay": ("delay_ms", parse_ms), "jitter": ("jitter_ms", parse_ms),
    "loss": ("loss_pct", parse_percent), "rate": ("rate_mbit", parse_rate),
    "reorder": ("reorder_pct", parse_percent), "duplicate": ("duplicate_pct", parse_percent),
    "loss_mode": ("loss_mode", _loss_mode),
}


def check_values(values: dict[str, object]) -> None:
    """Each value on its own (its form and bounds; not how it fits the others): LabError
    naming the first bad one. What a command checks before it looks for a lab."""
    for key, value in values.items():
        if key not in _PARSERS:
            raise LabError(f"{key}: unknown parameter (known: {', '.join(PARAM_WORDS)})",
                           field=key)
        _PARSERS[key][1](key, value)


def params_from(values: dict[str, object], base: LinkParams | None = None,
                where: str = "") -> LinkParams:
    """``base`` (default: nothing impaired) with the parameters in ``values`` (the words of
    :data:`PARAM_WORDS`, values as a user writes them) applied; LabError naming the first
    bad one."""
    p = base or LinkParams()
    prefix = f"{where}." if where else ""
    changes: dict[str, object] = {}
    for key, value in values.items():
        field = prefix + key
        if key not in _PARSERS:
            raise LabError(f"{field}: unknown parameter (known: {', '.join(PARAM_WORDS)})",
                           field=field)
        name, parse = _PARSERS[key]
        changes[name] = parse(field, value)
    try:
        return replace(p, **changes)  # type: ignore[arg-type]
    except ValueError as exc:
        raise LabError(f"{where}: {exc}" if where else str(exc), where=where) from None


# --- the router's configuration -----------------------------------------------------------

@dataclass(frozen=True)
class Leg(Message):
    """One side of the router: its NIC (by MAC) on a site's bridge."""

    site: str
    mac: str
    #: the router's address on the site's subnet, with the prefix (``10.1.0.254/24``)
    address: str


@dataclass(frozen=True)
class RouterConfig(Message):
    """``config.json`` of the router's config disk. The router's PID 1 configures the first
    leg's address (where the agent listens); the agent configures the other."""

    lab: str
    node: str
    #: the first leg's address (the agent listens there), and its MAC
    address: str
    mac: str
    gateway: str | None
    #: the lab secret, hex (the config disk is readable by the router only)
    secret: str
    legs: list[Leg]
    params: LinkParams
    #: whether the router forwards between its legs from the start (a link cut with ``wan
    #: set --down`` stays cut when its router is started again)
    up: bool = True
    agent: str = "labctl.agents.router"
    agent_port: int = WAN_AGENT_PORT

    @property
    def ip(self) -> str:
        return self.address.split("/", 1)[0]


# --- requests and replies -----------------------------------------------------------------

@dataclass(frozen=True)
class LegState(Message):
    """One leg as the router has it now."""

    site: str
    ifname: str
    up: bool
    #: the qdisc on the leg's egress as ``tc`` reports it (``netem limit 100000 delay 20ms``)
    qdisc: str
    #: packets netem dropped on this leg's egress since the router booted
    dropped: int
    sent_packets: int
    #: generic segmentation/receive offload on this leg (off in ``packet`` loss mode)
    offload: bool


@dataclass(frozen=True)
class RouterState(Message):
    """Reply of ``wan_show`` and ``wan_set``."""

    node: str
    params: LinkParams
    up: bool
    legs: list[LegState]
    uptime_s: float


@dataclass(frozen=True)
class LinkUp(Message):
    """Request of ``wan_link``: cut the link (the router stops forwarding) or restore it."""

    up: bool


WAN_SHOW = Method("wan_show", Empty, RouterState)
WAN_SET = Method("wan_set", LinkParams, RouterState)
WAN_LINK = Method("wan_link", LinkUp, RouterState)


# --- what the controller reports of a link ------------------------------------------------

@dataclass(frozen=True)
class WanShown(Message):
    """One WAN link as ``labctl wan show`` reports it."""

    name: str
    sites: list[str]
    #: the router's address on each site, in ``sites`` order
    addresses: list[str]
    #: what the link was asked to be (the topology, then ``wan set``)
    params: LinkParams
    #: ``up``, ``down`` (cut on purpose with ``wan set --down``), ``unreachable`` (its router
    #: runs but its agent does not answer: ``labctl up`` starts it again), or the router
    #: domain's state when it does not run (``shutoff``, ``crashed``, ``absent``...)
    state: str
    #: what the router has applied now (None when its agent does not answer)
    router: RouterState | None = None
    error: str | None = None
    #: libvirt's reason for the router domain's state (``destroyed``...)
    reason: str | None = None
