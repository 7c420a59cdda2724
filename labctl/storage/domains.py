"""A storage node's (or WAN router's) libvirt domain, seen from the controller: the
connection to libvirtd, the domains a lab owns (by the ownership recorded in their
metadata), and their state in words. Apart from :mod:`labctl.storage.node` so that
``labctl status`` asks libvirt without importing how nodes are built."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from labctl.core import names
from labctl.core.errors import MissingDependency, StorageNodeError

LIBVIRT_URI = "qemu:///system"
METADATA_NS = names.LIBVIRT_METADATA_NS

T = TypeVar("T")


def libvirt_module() -> Any:
    try:
        import libvirt  # noqa: PLC0415 (optional heavy module: only where libvirt runs)
    except ImportError as exc:
        raise MissingDependency("libvirt-python is not installed (run scripts/setup.sh)",
                                error=str(exc)) from exc
    # libvirt prints every error to stderr by default; we raise them with evidence instead
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def open_conn() -> Any:
    lv = libvirt_module()
    try:
        return lv.open(LIBVIRT_URI)
    except lv.libvirtError as exc:
        raise StorageNodeError(f"cannot connect to libvirt at {LIBVIRT_URI}: {exc}",
                               uri=LIBVIRT_URI) from exc


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


def owner(dom: Any) -> dict[str, str] | None:
    """The labctl ownership recorded in a domain's metadata, or None."""
    lv = libvirt_module()
    try:
        xml = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
    except lv.libvirtError:
        return None
    try:
        el = ET.fromstring(xml)
    except ET.ParseError:
        return None
    return {child.tag.split("}")[-1]: (child.text or "") for child in el}


def owned_domain(conn: Any, lab: str, name: str) -> Any:
    lv = libvirt_module()
    try:
        dom = conn.lookupByName(names.domain(lab, name))
    except lv.libvirtError as exc:
        raise StorageNodeError(f"no storage node domain {names.domain(lab, name)}",
                               domain=names.domain(lab, name)) from exc
    if (owner(dom) or {}).get("lab") != lab:
        raise StorageNodeError(f"domain {dom.name()} is not owned by lab {lab}", domain=dom.name())
    return dom


#: libvirt's state and reason codes (virDomainState, virDomainPausedReason, ...) in words
_STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff",
           6: "crashed", 7: "pmsuspended"}
_PAUSED = {1: "user", 2: "migration", 3: "save", 4: "dump", 5: "I/O error", 6: "watchdog",
           7: "from snapshot", 8: "shutting down", 9: "snapshot", 10: "crashed",
           11: "starting up", 12: "post-copy", 13: "post-copy failed"}
_SHUTOFF = {1: "shutdown", 2: "destroyed", 3: "crashed", 4: "migrated", 5: "saved",
            6: "failed", 7: "from snapshot", 8: "daemon"}


@dataclass(frozen=True)
class DomainState:
    """A storage node's domain as libvirt sees it: ``state`` (running, paused, shutoff,
    crashed, ...) and why (``reason``: for a pause "user", "I/O error", ...)."""

    state: str
    reason: str | None

    def __str__(self) -> str:
        return self.state + (f" ({self.reason})" if self.reason else "")


def state_of(dom: Any) -> DomainState:
    code, reason = dom.state()
    state = _STATES.get(code, f"state {code}")
    words = _PAUSED if code == 3 else _SHUTOFF if code == 5 else {}
    return DomainState(state, words.get(reason) if words else None)


def _domain_state(lab: str, name: str) -> DomainState:
    conn = open_conn()
    try:
        return state_of(owned_domain(conn, lab, name))
    except StorageNodeError:
        return DomainState("absent", None)
    finally:
        conn.close()


async def domain_state(lab: str, name: str) -> DomainState:
    """What libvirt says of storage node ``name``'s domain now ("absent" if it has none)."""
    return await in_thread(_domain_state, lab, name)


def _resume(lab: str, name: str) -> DomainState:
    lv = libvirt_module()
    conn = open_conn()
    try:
        dom = owned_domain(conn, lab, name)
        if dom.state()[0] == 3:
            try:
                dom.resume()
            except lv.libvirtError as exc:
                raise StorageNodeError(f"libvirt could not resume {dom.name()}: {exc}",
                                       domain=dom.name()) from exc
        return state_of(dom)
    finally:
        conn.close()


async def resume(lab: str, name: str) -> DomainState:
    """Resume a paused storage node (after its cause, e.g. a full disk, is gone)."""
    return await in_thread(_resume, lab, name)
