"""WAN links between sites, controller side: the router VM of each link (booted from the
node image with the router agent), the routes that make it the only path between its two
sites, its parameters at run time, and checks from outside (ping from a host's namespace).

A link's router has a leg on each site's bridge at the top of the site's subnet. Every host
of one site routes the other site's subnet through its own site's leg, so a packet between
the sites crosses the router, and netem, once each way. Hosts' TCP buffer limits are raised
(32 MiB), or one flow cannot fill a long fat link (measured: ~600 Mbit/s at 40 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from labctl.core import names
from labctl.core.errors import AgentError, LabError, LabStateError
from labctl.core.proc import run
from labctl.core.rpc import RpcClient
from labctl.state.context import LabContext
from labctl.state.inventory import Inventory
from labctl.storage import domains
from labctl.storage import node as storagenode
from labctl.storage import protocol as sp
from labctl.storage.image import StorageImage, ensure_storage_image
from labctl.wan import protocol as p
from labctl.wan.protocol import WanShown

ROLE = "wan-router"
ROUTER_MEMORY_MIB = 256
AGENT_FILES = ("labctl/__init__.py", "labctl/core/__init__.py", "labctl/core/errors.py",
               "labctl/core/rpc.py", "labctl/core/names.py", "labctl/core/wire.py",
               "labctl/core/proc.py", "labctl/wan/__init__.py", "labctl/wan/protocol.py",
               "labctl/wan/router.py", "labctl/agents/__init__.py", "labctl/agents/router.py")
"""The python pieces the router agent needs, copied onto its config disk."""


@dataclass(frozen=True)
class LinkRow:
    """A WAN link as the inventory has it."""

    name: str
    idx: int
    site_a: str
    site_b: str
    address_a: str
    address_b: str
    prefix_a: int
    prefix_b: int
    domain: str
    agent_port: int
    params: p.LinkParams
    up: bool
    memory_mib: int

    @staticmethod
    def of(row: Any) -> LinkRow:
        d = dict(row)
        d["params"] = p.LinkParams.from_wire(json.loads(d["params"]), "wan_links.params")
        d["up"] = bool(d["up"])
        return LinkRow(**d)

    @property
    def sites(self) -> tuple[str, str]:
        return self.site_a, self.site_b


def _shown(row: LinkRow, params: p.LinkParams, router: p.RouterState | None,
           up: bool | None = None) -> WanShown:
    """Link ``row`` as ``wan show`` reports it, with its router running (``up`` overrides
    the row's)."""
    return WanShown(name=row.name, sites=list(row.sites),
                    addresses=[row.address_a, row.address_b], params=params,
                    state="up" if (row.up if up is None else up) else "down", router=router)


def links(inv: Inventory) -> list[LinkRow]:
    return [LinkRow.of(r) for r in inv.rows("wan_links")]


def link(inv: Inventory, name: str) -> LinkRow:
    row = inv.row("wan_links", name=name)
    if row is None:
        known = ", ".join(r.name for r in links(inv)) or "none"
        raise LabStateError(f"unknown WAN link {name!r} (WAN links: {known})", link=name)
    return LinkRow.of(row)


def _legs(ctx: LabContext, row: LinkRow) -> list[p.Leg]:
    return [p.Leg(site=site, mac=names.mac(ctx.dir.tag, "w", row.idx * 2 + j),
                  address=f"{addr}/{prefix}")
            for j, (site, addr, prefix) in enumerate((
                (row.site_a, row.address_a, row.prefix_a),
                (row.site_b, row.address_b, row.prefix_b)))]


def _spec(ctx: LabContext, row: LinkRow) -> storagenode.StorageNodeSpec:
    sites = {r["name"]: r for r in ctx.inv.rows("sites")}
    legs = _legs(ctx, row)
    config = p.RouterConfig(lab=ctx.name, node=row.name, address=legs[0].address,
                            mac=legs[0].mac, gateway=None, secret=ctx.dir.secret().hex(),
                            legs=legs, params=row.params, up=row.up,
                            agent_port=row.agent_port)
    return storagenode.StorageNodeSpec(
        lab=ctx.name, name=row.name, address_cidr=legs[0].address,
        bridge=str(sites[row.site_a]["bridge"]), tap=names.wan_tap(ctx.dir.tag, row.idx, 0),
        mac=legs[0].mac, lab_dir=ctx.dir.path, secret=ctx.dir.secret(), target_iqn="",
        memory_mib=row.memory_mib, agent_port=row.agent_port, role=ROLE,
        extra_nics=[storagenode.Nic(str(sites[row.site_b]["bridge"]),
                                    names.wan_tap(ctx.dir.tag, row.idx, 1), legs[1].mac)],
        agent_config=config, agent_files=AGENT_FILES, subdir="wan", ready=p.WAN_SHOW,
        nic_offload=row.params.loss_mode == "gso")


async def start_router(ctx: LabContext, name: str, image: StorageImage, accel: str) -> float:
    """Boot link ``name``'s router (replacing a dead domain of it) with the link's stored
    parameters, and cut it again if it was down; returns the seconds to its agent."""
    row = link(ctx.inv, name)
    spec = _spec(ctx, row)
    ctx.inv.own("domain", spec.domain_name, lab_dir=str(ctx.dir.path))
    t0 = time.monotonic()
    await storagenode.start(spec, image, accel="kvm" if accel == "kvm" else "qemu")
    # pyroute2 (~90 ms to import) only here: `labctl status` and `wan show` need none of it
    from labctl.drivers import netlink  # noqa: PLC0415

    for j in (0, 1):
        netlink.label_link(names.wan_tap(ctx.dir.tag, row.idx, j),
                           names.alias(ctx.name, "tap", f"{row.name}-{'ab'[j]}"))
    return time.monotonic() - t0


def record(ctx: LabContext, idx: int, name: str, sites: tuple[str, str],
           addresses: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address],
           prefixes: tuple[int, int], params: p.LinkParams) -> None:
    """Put a topology's link in the inventory (its parameters only if it is new: ``wan
    set`` changes outlive an ``up`` of the same topology)."""
    have = ctx.inv.row("wan_links", name=name)
    ctx.inv.upsert("wan_links", name=name, idx=idx, site_a=sites[0], site_b=sites[1],
                   address_a=str(addresses[0]), address_b=str(addresses[1]),
                   prefix_a=prefixes[0], prefix_b=prefixes[1],
                   domain=names.domain(ctx.name, name), agent_port=p.WAN_AGENT_PORT,
                   params=have["params"] if have else json.dumps(params.to_wire()),
                   up=have["up"] if have else 1, memory_mib=ROUTER_MEMORY_MIB)


def site_routes(ctx: LabContext) -> dict[str, list[sp.Route]]:
    """Each linked site's routes to the sites across its links: the other site's subnet
    through the link's router address on this side."""
    sites = {r["name"]: r for r in ctx.inv.rows("sites")}
    routes: dict[str, list[sp.Route]] = {}
    for row in links(ctx.inv):
        for site, other, via in ((row.site_a, row.site_b, row.address_a),
                                 (row.site_b, row.site_a, row.address_b)):
            routes.setdefault(site, []).append(sp.Route(str(sites[other]["subnet"]), via))
    return routes


async def route_hosts(ctx: LabContext) -> None:
    """Every host of a linked site reaches the other site through the link's router, with
    TCP buffers that let one flow fill the link (``ctx``: the lab's own context)."""
    routes = site_routes(ctx)
    for h in [h for site in ctx.all_sites() for h in site.inv.rows("hosts")]:
        for r in routes.get(str(h["site"]), []):
            await run(["ip", "route", "replace", r.subnet, "via", r.via],
                      netns=str(h["netns"]), what=f"route to {r.subnet} on {h['name']}")
        if str(h["site"]) in routes:
            for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
                await run(["sysctl", "-q", "-w", f"{key}={names.TCP_BUFFERS}"],
                          netns=str(h["netns"]), what=f"{key} on {h['name']}")


async def route_nodes(ctx: LabContext, node: str | None = None) -> None:
    """Every storage node of a linked site (or just ``node``) reaches the other site through
    the link's router: a file copy between sites goes from node to node over the WAN."""
    routes = site_routes(ctx)
    for site in ctx.all_sites():  # each site's nodes, through that site's controller
        for n in site.inv.rows("storage_nodes"):
            if (node is not None and n["name"] != node) or n["state"] != "up":
                continue
            async with site.storage_client(str(n["name"])) as c:
                await sp.SET_ROUTES.call(c, sp.SetRoutes(routes=routes.get(str(n["site"]), [])))


@contextlib.asynccontextmanager
async def _client(ctx: LabContext, row: LinkRow, timeout: float = 5.0
                  ) -> AsyncIterator[RpcClient]:
    """An authenticated connection to a link's router agent (closed on exit)."""
    client = await RpcClient.connect(row.address_a, row.agent_port, ctx.dir.secret(),
                                     timeout=timeout, peer=f"WAN router {row.name}")
    try:
        yield client
    finally:
        await client.close()


async def show(ctx: LabContext) -> list[WanShown]:
    """Every link: what it was asked to be, and what its router applied now."""
    out = []
    for row in links(ctx.inv):
        dom = await domains.domain_state(ctx.name, row.name)
        base = _shown(row, row.params, None)
        if dom.state != "running":
            out.append(base.replace(state=dom.state, reason=dom.reason))
            continue
        try:
            async with _client(ctx, row, timeout=3.0) as c:
                state = await p.WAN_SHOW.call(c, timeout=10)
            out.append(base.replace(router=state))
        except (AgentError, LabError) as exc:
            out.append(base.replace(state="unreachable", error=exc.message))
    return out


async def set_params(ctx: LabContext, name: str, values: dict[str, object]) -> WanShown:
    """Change link ``name``'s parameters (the words of ``PARAM_WORDS``, as a user writes
    them); nothing changes when one is refused."""
    row = link(ctx.inv, name)
    params = p.params_from(values, row.params)
    if params.loss_mode != row.params.loss_mode:
        # the NICs' offloads towards the host are set when the VM starts: a new loss mode
        # needs a new router (about 5 s), which comes up with the new parameters
        ctx.inv.update("wan_links", {"name": name}, params=json.dumps(params.to_wire()))
        ctx.progress(f"WAN link {name}: loss mode {params.loss_mode} needs the router "
                     "started again with other NIC offloads")
        image = await ensure_storage_image(progress=ctx.progress)
        await start_router(ctx, name, image, ctx.inv.get_meta("accel", "tcg") or "tcg")
        if row.up:
            await wait_round_trip(ctx, row, 20.0)
        async with _client(ctx, row) as c:  # it booted with them: nothing to apply again
            state = await p.WAN_SHOW.call(c, timeout=30)
        return _shown(row, params, state)
    async with _client(ctx, row) as c:
        state = await p.WAN_SET.call(c, params, timeout=30)
    ctx.inv.update("wan_links", {"name": name}, params=json.dumps(params.to_wire()))
    return _shown(row, params, state)


async def set_up(ctx: LabContext, name: str, up: bool, budget: float = 10.0) -> WanShown:
    """Cut link ``name`` (its router stops forwarding) or restore it; a restore returns only once
    a real round trip crosses the link (a ping from a host of one site to one of the
    other), else it fails saying so."""
    row = link(ctx.inv, name)
    async with _client(ctx, row) as c:
        state = await p.WAN_LINK.call(c, p.LinkUp(up=up), timeout=30)
    ctx.inv.update("wan_links", {"name": name}, up=int(up))
    if up:
        waited = await wait_round_trip(ctx, row, budget)
        ctx.progress(f"WAN link {name} is up: a round trip crossed it after {waited:.2f} s")
    return _shown(row, row.params, state, up=up)


def endpoints(ctx: LabContext, row: LinkRow) -> tuple[dict[str, Any], str]:
    """A host of the link's first site (its row) and a target across the link: a host of
    the second site, else the router's far leg."""
    hosts = [h for site in ctx.all_sites() for h in site.inv.rows("hosts", kind="host")]
    near = next((h for h in hosts if h["site"] == row.site_a), None)
    if near is None:
        raise LabStateError(f"site {row.site_a} has no host to measure WAN link {row.name} "
                            "from", link=row.name)
    far = next((h for h in hosts if h["site"] == row.site_b), None)
    return dict(near), str(far["address"]) if far is not None else row.address_b


async def ping(netns: str, address: str, count: int = 5, interval: float = 0.2,
               timeout: float = 2.0) -> list[float]:
    """Round trips in ms of ``count`` pings from ``netns`` to ``address`` (those answered)."""
    res = await run(["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", f"{timeout:g}",
                     address], netns=netns, check=False,
                    timeout=count * interval + timeout + 10, what=f"ping {address}")
    return [float(m) for m in re.findall(r"time=([0-9.]+) ms", res.stdout)]


async def wait_round_trip(ctx: LabContext, row: LinkRow, budget: float) -> float:
    """Seconds until a ping crosses the link; LabError after ``budget`` seconds."""
    near, far = endpoints(ctx, row)
    t0 = time.monotonic()
    while True:
        if await ping(str(near["netns"]), far, count=1, timeout=1.0):
            return time.monotonic() - t0
        if time.monotonic() - t0 > budget:
            raise LabError(f"WAN link {row.name}: no round trip from {near['name']} to {far} "
                           f"within {budget:g} s after bringing it up", link=row.name)
        await asyncio.sleep(0.1)


async def rtt_ms(ctx: LabContext, name: str, count: int = 10) -> list[float]:
    """Round trips across link ``name`` measured from outside labctl's agents: ping from a
    host of one site to a host of the other."""
    row = link(ctx.inv, name)
    near, far = endpoints(ctx, row)
    got = await ping(str(near["netns"]), far, count=count)
    if not got:
        raise LabError(f"WAN link {name}: no ping from {near['name']} to {far} came back",
                       link=name)
    return got
