"""The mobility agents' own protocol: what a site's controller tells its agent about a
migration to or from another site, and the control messages the two agents exchange over
their relay's ``control`` stream.

Besides these, a mobility agent answers the host agent's migration protocol
(:mod:`labctl.migration.protocol`): site A's agent as a destination host, site B's as a
source host. Imports only core and the protocols (it ships into the agents).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from labctl.core.wire import Empty, Json, Message, Method
from labctl.hosts.protocol import VmName, VmSpec
from labctl.migration.protocol import DestFinished, HeartbeatStamp

#: the relay's streams: the agents' own messages, QEMU's migration stream, the mirror's NBD
STREAMS = ("control", "memory", "disk")


@dataclass(frozen=True)
class Outgoing(Message):
    """``mob_outgoing`` (site A's controller to its agent): the next migration of ``vm``
    to this agent goes on to agent ``peer`` of the other site, whose relay listens at
    ``peer_address:peer_port`` (its certificate names it ``peer``)."""

    vm: str
    #: the ID both sites' records of this migration carry
    migration: str
    peer: str
    peer_address: str
    peer_port: int
    compress: bool = False
    #: bytes a relay stream may have in flight (about the WAN's bandwidth-delay product;
    #: None: the relay's default)
    window: int | None = None


@dataclass(frozen=True)
class Incoming(Message):
    """``mob_incoming`` (site B's controller to its agent): ``vm`` comes from agent
    ``peer`` of the other site; this agent poses as its source host."""

    vm: str
    migration: str
    peer: str


@dataclass(frozen=True)
class RelayStats(Message):
    """``mob_stats``: what the relay carried for one migration, per stream (bytes from
    site A to B ``out``, back ``back``, and on the wire after compression ``wire``)."""

    vm: str
    migration: str
    role: Literal["outgoing", "incoming"]
    #: announced, prepared, running, completed, failed
    state: str
    out: dict[str, int] = field(default_factory=dict)
    back: dict[str, int] = field(default_factory=dict)
    wire: dict[str, int] = field(default_factory=dict)
    #: from the relay's connection to its end
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class MobilityPing(Message):
    """Part of ``ping``'s answer a controller checks: the agent and its relay port."""

    name: str
    relay_port: int


@dataclass(frozen=True)
class Control(Message):
    """One message on the ``control`` stream (a JSON line each).

    A to B: ``prepare`` (the VM's spec and disk size, whether its disk is mirrored),
    ``completed`` (the source finished: its last heartbeat), ``abort`` (site A gave up),
    ``alive`` (every second: B gives up on a silent A). B to A: ``ready`` (site B's
    destination listens; the relay's memory and disk streams reach it), ``finished`` (site
    B verified the guest: what its destination reported), ``failed`` (site B gave up)."""

    op: Literal["prepare", "ready", "completed", "finished", "failed", "abort", "alive"]
    vm: str
    migration: str = ""
    spec: VmSpec | None = None
    disk_size: int | None = None
    mirror: bool = False
    heartbeat: HeartbeatStamp | None = None
    final: Json = None
    dest: DestFinished | None = None
    error: str | None = None


MOB_OUTGOING = Method("mob_outgoing", Outgoing, RelayStats)
MOB_INCOMING = Method("mob_incoming", Incoming, RelayStats)
MOB_STATS = Method("mob_stats", VmName, RelayStats)
MOB_PING = Method("mob_ping", Empty, MobilityPing)
