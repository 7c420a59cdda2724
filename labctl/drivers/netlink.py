"""Network namespaces, bridges and veths through pyroute2 (netlink, no `ip` execs).

Operations are ensure-style and idempotent. Every link labctl creates carries
an interface alias ``labctl:<lab>:<role>:<name>``; removal checks that alias,
so teardown only ever deletes links the lab owns, whatever their name.

A network namespace is marked the same way: the alias of its ``lo`` is the lab's mark
(``labctl:<lab>:netns:<host>@<tag>``, :func:`labctl.core.names.netns_mark`), set before the
namespace gets its name, so a namespace is taken or removed only if it carries that mark;
a namespace's name (the same for a lab of the same name under another home) proves nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import ipaddress
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from labctl.core.errors import NetworkSetupError

_P = ParamSpec("_P")
_R = TypeVar("_R")

_CLONE_NEWNET = 0x40000000


def _netlink(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """pyroute2's sync sockets refuse to work in a thread whose event loop is running: there,
    run the (millisecond) netlink exchange in a worker thread and wait for it."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(fn, *args, **kwargs).result()

    return wrapper


def _index(ipr: IPRoute | NetNS, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _fail(what: str, exc: Exception, **evidence: object) -> NetworkSetupError:
    return NetworkSetupError(f"{what}: {exc}", **evidence)


def _foreign_link(ifname: str, have: object) -> NetworkSetupError:
    return NetworkSetupError(f"a network interface named {ifname} exists and belongs to another "
                             f"lab (alias {have!r}): refusing to touch it", ifname=ifname, alias=have)


@_netlink
def ensure_bridge(ifname: str, alias: str, address: ipaddress.IPv4Interface) -> None:
    """A bridge in this namespace with ``address`` on it, up. Refuses a foreign link of that name."""
    try:
        with IPRoute() as ipr:
            idx = _index(ipr, ifname)
            if idx is None:
                ipr.link("add", ifname=ifname, kind="bridge")
                idx = _index(ipr, ifname)
                assert idx is not None
                ipr.link("set", index=idx, ifalias=alias)
            else:
                have = ipr.get_links(idx)[0].get_attr("IFLA_IFALIAS")
                if have != alias:
                    raise _foreign_link(ifname, have)
            addrs = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
            if (str(address.ip), address.network.prefixlen) not in addrs:
                ipr.addr("add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen)
            ipr.link("set", index=idx, state="up")
    except NetlinkError as exc:
        raise _fail(f"cannot set up bridge {ifname}", exc, ifname=ifname) from exc


def _lo_alias(ns: IPRoute | NetNS) -> str | None:
    lo = _index(ns, "lo")
    have = ns.get_links(lo)[0].get_attr("IFLA_IFALIAS") if lo is not None else None
    return str(have) if have else None


def _netns_mark(name: str) -> str | None:
    """The mark namespace ``name`` carries (the alias of its ``lo``), None if it has none.
    Raises OSError if there is no such namespace or it cannot be entered (an empty
    ``/run/netns/<name>`` left by a creation killed before its bind mount)."""
    with NetNS(name, flags=0) as ns:  # flags=0: never create it
        return _lo_alias(ns)


def _create_marked(name: str, mark: str) -> None:
    """Create network namespace ``name`` already carrying ``mark``, its ``lo`` up.

    A thread of our own unshares a fresh namespace (the network namespace is per thread;
    this thread ends with the call), marks its ``lo`` from inside, and only then binds it
    to ``name`` (pyroute2's ``netns.attach``: the ``O_EXCL`` mountpoint and bind mount of
    ``ip netns add``). So there is no moment at which a namespace of that name exists
    unmarked: a controller killed before the bind leaves no namespace at all. Raises
    FileExistsError if ``name`` was taken meanwhile."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(_CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare: {os.strerror(err)}")
            with IPRoute() as ipr:  # opened in this thread: in the new namespace
                lo = _index(ipr, "lo")
                assert lo is not None
                ipr.link("set", index=lo, ifalias=mark)
                ipr.link("set", index=lo, state="up")
            netns.attach(name, threading.get_native_id())
        except BaseException as exc:
            failed.append(exc)

    worker = threading.Thread(target=run, name=f"netns {name}")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]


def _foreign_netns(name: str, have: str | None, mark: str) -> NetworkSetupError:
    why = (f"its lo is marked {have!r}, this lab's mark is {mark!r}" if have is not None
           else "its lo carries no labctl mark")
    return NetworkSetupError(f"network namespace {name} exists and belongs to another lab ({why}): "
                             "refusing to touch it", netns=name, mark=have, want=mark)


@_netlink
def ensure_netns(name: str, mark: str) -> None:
    """Network namespace ``name`` of the lab whose mark is ``mark``, its ``lo`` up.

    Created marked (:func:`_create_marked`) if there is none; a namespace of that name is
    taken only if it carries ``mark``, refused otherwise (another lab's, or none of
    labctl's)."""
    if name not in netns.listnetns():
        try:
            _create_marked(name, mark)
            return
        except FileExistsError:
            pass  # someone made it meanwhile: it is checked like any existing one
        except (OSError, NetlinkError) as exc:
            raise _fail(f"cannot create network namespace {name}", exc, netns=name) from exc
    try:
        with NetNS(name, flags=0) as ns:
            have = _lo_alias(ns)
            if have != mark:
                raise _foreign_netns(name, have, mark)
            lo = _index(ns, "lo")
            assert lo is not None
            ns.link("set", index=lo, state="up")
    except OSError as exc:
        raise NetworkSetupError(f"network namespace {name} exists and cannot be entered ({exc}): "
                                "refusing to touch it", netns=name) from exc
    except NetlinkError as exc:
        raise _fail(f"cannot set up network namespace {name}", exc, netns=name) from exc


@dataclass(frozen=True)
class VethSpec:
    outer: str  # name on the bridge side (root namespace)
    netns: str
    bridge: str
    address: ipaddress.IPv4Interface
    alias: str
    inner: str = "eth0"


@_netlink
def ensure_veth(spec: VethSpec) -> None:
    """A veth from ``spec.bridge`` into ``spec.netns``, named ``inner`` there, addressed and up."""
    try:
        with IPRoute() as ipr:
            outer = _index(ipr, spec.outer)
            if outer is None:
                peer = spec.outer + "p"
                ipr.link("add", ifname=spec.outer, kind="veth", peer={"ifname": peer})
                outer = _index(ipr, spec.outer)
                peer_idx = _index(ipr, peer)
                assert outer is not None and peer_idx is not None
                ipr.link("set", index=outer, ifalias=spec.alias)
                ipr.link("set", index=peer_idx, ifalias=spec.alias + ":inner")
                ipr.link("set", index=peer_idx, net_ns_fd=spec.netns)
                with NetNS(spec.netns, flags=0) as ns:
                    idx = _index(ns, peer)
                    assert idx is not None
                    ns.link("set", index=idx, ifname=spec.inner)
            elif (have := ipr.get_links(outer)[0].get_attr("IFLA_IFALIAS")) != spec.alias:
                raise _foreign_link(spec.outer, have)
            bridge = _index(ipr, spec.bridge)
            if bridge is None:
                raise NetworkSetupError(f"bridge {spec.bridge} does not exist", bridge=spec.bridge)
            ipr.link("set", index=outer, master=bridge, state="up")
        with NetNS(spec.netns, flags=0) as ns:
            idx = _index(ns, spec.inner)
            if idx is None:
                raise NetworkSetupError(f"{spec.inner} is missing in namespace {spec.netns}",
                                        netns=spec.netns)
            addrs = {a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=idx)}
            if str(spec.address.ip) not in addrs:
                ns.addr("add", index=idx, address=str(spec.address.ip),
                        prefixlen=spec.address.network.prefixlen)
            ns.link("set", index=idx, state="up")
    except (NetlinkError, OSError) as exc:  # OSError: the namespace is gone (never re-made here)
        raise _fail(f"cannot set up veth {spec.outer} into {spec.netns}", exc,
                    veth=spec.outer, netns=spec.netns) from exc


@_netlink
def label_link(ifname: str, alias: str) -> None:
    """Give a link another program created for the lab (libvirt's tap) the lab's alias.
    A link that already carries a different alias is left alone."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            raise NetworkSetupError(f"no link {ifname} to label", ifname=ifname)
        have = ipr.get_links(idx)[0].get_attr("IFLA_IFALIAS")
        if have in (None, "", alias):
            ipr.link("set", index=idx, ifalias=alias)


@_netlink
def set_link_state(ifname: str, up: bool, alias: str) -> None:
    """Bring an owned link up or down (used to cut a host off its network)."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        if idx is None or ipr.get_links(idx)[0].get_attr("IFLA_IFALIAS") != alias:
            raise NetworkSetupError(f"no link {ifname} of this lab", ifname=ifname)
        ipr.link("set", index=idx, state="up" if up else "down")


@_netlink
def delete_link(ifname: str, alias: str) -> bool:
    """Delete ``ifname`` if it exists and carries ``alias``. True if something was removed."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return False
        have = ipr.get_links(idx)[0].get_attr("IFLA_IFALIAS")
        if have != alias:
            return False
        with contextlib.suppress(NetlinkError):
            ipr.link("del", index=idx)
        return True


@_netlink
def delete_netns(name: str, mark: str) -> bool:
    """Delete network namespace ``name`` if it exists and carries ``mark``. True if something
    was removed; a namespace without the mark (another lab's, none of labctl's, or an empty
    ``/run/netns`` entry that is no namespace) is left alone."""
    if name not in netns.listnetns():
        return False
    try:
        have = _netns_mark(name)
    except OSError:
        return False
    except NetlinkError as exc:
        raise _fail(f"cannot read the mark of network namespace {name}", exc, netns=name) from exc
    if have is None or have != mark:
        return False
    try:
        netns.remove(name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise _fail(f"cannot remove network namespace {name}", exc, netns=name) from exc
    return True


@_netlink
def overlapping_routes(subnet: ipaddress.IPv4Network,
                       own_bridge: tuple[str, str] | None = None) -> list[str]:
    """Routes and addresses of this machine that overlap ``subnet``, but those of
    ``own_bridge`` (name, alias) if a link has that name and carries that alias: the bridge
    :func:`ensure_bridge` would take for ``subnet``, not a clash."""
    found: list[str] = []
    with IPRoute() as ipr:
        links = ipr.get_links()
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        ignored = {link["index"] for link in links if own_bridge is not None and own_bridge
                   == (link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_IFALIAS"))}
        for addr in ipr.get_addr(family=2):
            if addr["index"] in ignored:
                continue
            ifname = names.get(addr["index"], "?")
            net = ipaddress.IPv4Interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}").network
            if net.overlaps(subnet) and not net.is_loopback:
                found.append(f"{net} on {ifname}")
        for route in ipr.get_routes(family=2, table=254):
            dst = route.get_attr("RTA_DST")
            if dst is None or route["dst_len"] == 0 or route.get_attr("RTA_OIF") in ignored:
                continue
            ifname = names.get(route.get_attr("RTA_OIF"), "?")
            net = ipaddress.IPv4Network(f"{dst}/{route['dst_len']}", strict=False)
            if net.overlaps(subnet) and not net.is_loopback and f"{net} on {ifname}" not in found:
                found.append(f"{net} via {ifname}")
    return found
