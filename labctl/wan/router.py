"""The WAN router's agent: runs inside the router VM (the node image booted with the
Debian cloud kernel, whose ``sch_netem`` the machine's own kernel may lack) and puts the
link's parameters on each leg's egress with real netem, through ``tc`` (argument lists,
never a shell). Standard library plus ``labctl.core`` and the WAN protocol only.

One leg per site: packets from site A leave through site B's leg and get its netem, and
the other way round, so each direction is impaired once and a round trip twice. Changing
the parameters replaces the qdisc (delete, then add: ``tc qdisc replace`` keeps an old
``rate``). Loss mode ``packet`` turns GSO/GRO/TSO off on both legs, so netem sees wire
packets instead of 64 KB super-packets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from labctl.core.errors import LabError, ProtocolError
from labctl.core.proc import run
from labctl.core.rpc import Handler, RpcServer
from labctl.core.wire import Empty, Json, handlers
from labctl.wan import protocol as p

log = logging.getLogger("labctl.router")
#: segmentation and receive offloads: off in ``packet`` loss mode. ``lro`` is what the
#: virtio NIC calls the host handing it 64 KB packets (its guest offloads): with it on, the
#: router receives super-packets whatever its own GRO says
_OFFLOADS = ("gso", "gro", "tso", "lro")


def _ifname_of(mac: str, sys_net: Path = Path("/sys/class/net")) -> str:
    for entry in sorted(sys_net.iterdir()):
        try:
            if (entry / "address").read_text().strip().lower() == mac.lower():
                return entry.name
        except OSError:
            continue
    raise LabError(f"no interface with MAC {mac} on the router", mac=mac)


def _uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()


class Router:
    """The link's state: its parameters, whether it is up, and each leg's interface."""

    def __init__(self, config: p.RouterConfig) -> None:
        self.config = config
        self.node = config.node
        self.params = config.params
        self.up = True
        self.ifnames: list[str] = []
        self.offload = True
        self._lock = asyncio.Lock()

    def handlers(self) -> dict[str, Handler]:
        return handlers(p.WAN_SHOW.serve(self.show), p.WAN_SET.serve(self.set),
                        p.WAN_LINK.serve(self.link))

    async def setup(self) -> None:
        """Address every leg (PID 1 did the first), forward between them, apply the params."""
        for i, leg in enumerate(self.config.legs):
            ifname = _ifname_of(leg.mac)
            self.ifnames.append(ifname)
            if i > 0:
                await run(["ip", "addr", "replace", leg.address, "dev", ifname],
                          what=f"addressing {ifname}")
            await run(["ip", "link", "set", ifname, "up"], what=f"bringing {ifname} up")
        _forwarding(self.config.up)
        self.up = self.config.up
        # a forwarded packet never needs an ICMP redirect: the hosts route through us on purpose
        for conf in Path("/proc/sys/net/ipv4/conf").iterdir():
            (conf / "send_redirects").write_text("0\n")
        await self._apply(self.params)

    async def _apply(self, params: p.LinkParams) -> None:
        # offloads first: changing a virtio NIC's features may reset its queues, and with
        # them the qdisc on top
        offload = params.loss_mode == "gso"
        if offload != self.offload:
            for ifname in self.ifnames:
                await self._offload(ifname, offload)
            self.offload = offload
        for ifname in self.ifnames:
            await run(["tc", "qdisc", "del", "dev", ifname, "root"], check=False,
                      what=f"tc qdisc del on {ifname}")
            await run(["tc", "qdisc", "add", "dev", ifname, "root", "netem",
                       *params.netem_args()], what=f"netem on {ifname}")
        self.params = params

    async def _offload(self, ifname: str, on: bool) -> None:
        args = [w for o in _OFFLOADS for w in (o, "on" if on else "off")]
        await run(["ethtool", "-K", ifname, *args], check=False, what=f"ethtool -K {ifname}")

    def _leg(self, site: str, ifname: str, qd: Json, link: Json) -> p.LegState:
        """A leg's state from its root qdisc and its link as ``tc -j`` and ``ip -j`` list
        them (empty when the device is not listed)."""
        qd = qd if isinstance(qd, dict) else {}
        flags = link.get("flags", []) if isinstance(link, dict) else []
        words = [str(qd.get("kind", "?"))]
        for k, v in (qd.get("options") or {}).items():  # tc's JSON nests delay, rate...
            for kk, vv in (v.items() if isinstance(v, dict) else [(k, v)]):
                if vv not in (0, None, False, "", [], {}):
                    words.append(f"{kk} {vv}")
        text = " ".join(words)
        return p.LegState(site=site, ifname=ifname, up="UP" in flags, qdisc=text.strip(),
                          dropped=int(qd.get("drops", 0)), sent_packets=int(qd.get("packets", 0)),
                          offload=self.offload)

    async def _state(self) -> p.RouterState:
        # one listing of every qdisc and every link, the two at once: each program started
        # costs tens of ms in this TCG VM, and `labctl status` asks for this
        q, links = await asyncio.gather(
            run(["tc", "-s", "-j", "qdisc", "show"], what="tc qdisc show"),
            run(["ip", "-j", "link", "show"], what="ip link show"))
        try:
            qdiscs = {d.get("dev"): d for d in json.loads(q.stdout) or [] if d.get("root")}
            by_name = {d.get("ifname"): d for d in json.loads(links.stdout) or []}
        except (ValueError, AttributeError) as exc:
            raise LabError(f"cannot read the state of the router's legs: {exc}") from exc
        legs = [self._leg(leg.site, ifname, qdiscs.get(ifname, {}), by_name.get(ifname, {}))
                for leg, ifname in zip(self.config.legs, self.ifnames, strict=True)]
        return p.RouterState(node=self.node, params=self.params, up=self.up, legs=legs,
                             uptime_s=round(_uptime(), 2))

    # RPC methods -------------------------------------------------------------------------
    async def show(self, _: Empty) -> p.RouterState:
        async with self._lock:
            return await self._state()

    async def set(self, params: p.LinkParams) -> p.RouterState:
        async with self._lock:
            await self._apply(params)
            log.info("link %s", params.describe())
            return await self._state()

    async def link(self, req: p.LinkUp) -> p.RouterState:
        """Cut the link or restore it: the router stops forwarding between its legs (its
        legs stay up, so the controller still reaches this agent on the first one)."""
        async with self._lock:
            _forwarding(req.up)
            self.up = req.up
            log.info("link %s", "up" if req.up else "down")
            return await self._state()


def _forwarding(on: bool) -> None:
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n" if on else "0\n")


async def serve(config: Json, on_ready: Callable[[], None] | None = None) -> None:
    """Serve the router agent's RPC on the first leg's address (``config`` is
    ``config.json`` of the config disk, a :class:`~labctl.wan.protocol.RouterConfig`)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="labctl-router: %(message)s")
    # PID 1's environment has no PATH of its own; tc and ethtool live in /usr/sbin
    os.environ["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    try:
        conf = p.RouterConfig.from_wire(config, "router agent config")
        secret = bytes.fromhex(conf.secret)
    except (ProtocolError, ValueError) as exc:
        raise LabError(f"bad router agent config: {exc!r}") from exc
    router = Router(conf)
    await router.setup()
    server = RpcServer(secret, router.handlers(), name=f"router agent {conf.node}")
    await server.start(conf.ip, conf.agent_port)
    log.info("router %s up (pid %d): %s", conf.node, os.getpid(), conf.params.describe())
    if on_ready is not None:
        on_ready()
    await server.serve_forever()
