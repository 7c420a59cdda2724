"""The storage agent's protocol: what the controller and the rescan service ask of a
storage node, and the storage events it publishes. Imports only ``labctl.core``."""

from __future__ import annotations

from dataclasses import dataclass

from labctl.core.wire import Empty, Message, Method


@dataclass(frozen=True)
class NodePing(Message):
    node: str
    #: seconds since the node booted: a smaller value than last time means it restarted
    uptime_s: float
    portal_down: bool


PING = Method("ping", Empty, NodePing)
