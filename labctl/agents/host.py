"""The host agent: one per lab host, running inside the host's network namespace.

    python -m labctl.agents.host --lab-dir DIR --host NAME --listen IP:PORT

It serves :class:`labctl.rpc.RpcServer` (lab secret from ``<lab-dir>/secret``),
runs workload VMs as QEMU processes (so they live in the same namespace), and
keeps the host's storage cache (what it last saw of each LUN). State lives in
``<lab-dir>/hosts/<host>/``: ``agent.pid``, ``agent.log`` and ``vms/<vm>/``
(QEMU's pidfile, qmp.sock, console.sock, console.log, qemu.log).

Events pushed to subscribers: ``vm_exited`` {host, name, returncode, console_tail}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from labctl import iscsi
from labctl.errors import LabError, LabStateError, MissingDependency, VmError
from labctl.guestimage import (
    DEFAULT_HEARTBEAT_MS,
    DEFAULT_WSS_MIB,
    HEARTBEAT_MS_MAX,
    HEARTBEAT_MS_MIN,
    ensure_guest_image,
    guest_append,
    valid_heartbeat_ms,
)
from labctl.labdir import read_secret
from labctl.proc import which
from labctl.qemu import QEMU_BINARY, QemuVm, VmSpec, VmState, kvm_usable, qemu_version
from labctl.rpc import Handler, RpcServer

log = logging.getLogger("labctl.agents.host")

DEFAULT_PORT = 7600
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_CONSOLE_COMMANDS = {"rate": "OK rate", "wss": "OK wss", "read": "DISK read",
                     "sync": "DISK wrote", "size": "DISK size"}


def _mem_available() -> int | None:
    """The machine's MemAvailable in bytes (what a new QEMU can really get), if known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class HostAgent:
    """The agent's state and its RPC methods (each returns JSON-able data)."""

    def __init__(self, lab_dir: Path, host: str) -> None:
        if not _NAME_RE.match(host):
            raise LabError(f"bad host name {host!r}", host=host)
        self.lab_dir = lab_dir
        self.host = host
        self.state_dir = lab_dir / "hosts" / host
        self.vms: dict[str, QemuVm] = {}
        self.lun_cache: dict[str, dict[str, Any]] = {}
        self.server: RpcServer | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._accel_task: asyncio.Task[str] | None = None

    # -- helpers
    def handlers(self) -> dict[str, Handler]:
        return {
            "ping": self.ping, "vm_start": self.vm_start, "vm_stop": self.vm_stop,
            "vm_status": self.vm_status, "vm_list": self.vm_list,
            "vm_console": self.vm_console, "vm_console_tail": self.vm_console_tail,
            "scan_luns": self.scan_luns, "lun_cache": self.get_lun_cache,
            **self._migration_handlers(),
            **self._storage_handlers(),
        }

    def _storage_handlers(self) -> dict[str, Handler]:
        from labctl.agents.host_storage import HostStorage

        if not hasattr(self, "storage"):
            self.storage = HostStorage(self)
        return self.storage.handlers()

    def _migration_handlers(self) -> dict[str, Handler]:
        from labctl.agents.host_migration import MigrationHandlers

        return MigrationHandlers(self).handlers()

    def _vm(self, name: Any) -> QemuVm:
        if not isinstance(name, str) or name not in self.vms:
            raise LabStateError(f"host {self.host} has no VM named {name!r}", host=self.host,
                                vm=name, known=sorted(self.vms))
        return self.vms[name]

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _accel_probe(self) -> asyncio.Task[str]:
        """The KVM probe, started on first use and run once."""
        if self._accel_task is None:
            self._accel_task = asyncio.ensure_future(self._probe_accel())
        return self._accel_task

    def checked_spec(self, fields: dict[str, Any], method: str) -> VmSpec:
        """A VM spec from its wire form, with its kernel and initrd present on this host."""
        try:
            vmspec = VmSpec.from_dict(fields)
        except (ValueError, TypeError) as exc:
            raise LabError(f"{method}: bad VM spec: {exc}", spec=fields) from exc
        for path in (vmspec.kernel, vmspec.initrd):
            if not path.is_file():
                raise LabError(f"{method}: {path} does not exist on host {self.host}")
        return vmspec

    def check_not_running(self, name: str) -> None:
        """Refuse a second QEMU for VM ``name`` here (call with its lock held)."""
        old = self.vms.get(name)
        if old is not None and old.state in (VmState.STARTING, VmState.RUNNING):
            raise LabStateError(f"VM {name} already runs on host {self.host}", vm=name,
                                pid=old.pid)

    async def accel(self) -> str:
        """"kvm" when a probe showed KVM really runs the test guest here, else "tcg"."""
        return await asyncio.shield(self._accel_probe())

    async def _probe_accel(self) -> str:
        try:
            return "kvm" if await asyncio.to_thread(kvm_usable) else "tcg"
        except LabError as exc:
            log.warning("KVM probe failed (%s): using TCG", exc)
            return "tcg"

    def on_vm_event(self, vm: QemuVm, event: dict[str, Any]) -> None:
        """A QMP event of one of our VMs: I/O errors on its disk become storage events."""
        if event["event"] == "BLOCK_IO_ERROR":
            self.storage.vm_io_error(vm, event)

    def _on_exit(self, vm: QemuVm) -> None:
        if self.server is not None:
            self.server.publish("vm_exited", {"host": self.host, "name": vm.spec.name,
                                              "returncode": vm.returncode,
                                              "console_tail": vm.console_tail(10)})

    # -- RPC methods
    async def ping(self) -> dict[str, Any]:
        try:
            version: str | None = await asyncio.to_thread(qemu_version)
        except MissingDependency:
            version = None
        probe = self._accel_probe()
        accel = probe.result() if probe.done() else "probing"
        return {"host": self.host, "pid": os.getpid(), "qemu_version": version, "accel": accel,
                "mem_available": _mem_available()}

    async def vm_start(self, spec: dict[str, Any], heartbeat_timeout: float = 60.0
                       ) -> dict[str, Any]:
        """Start a VM and wait (bounded) for its first heartbeat.

        ``spec`` is :meth:`VmSpec.to_dict` form; ``kernel``/``initrd``/``append`` may be left
        out for the test guest, which then takes ``rate_mib_s``, ``wss_mib`` and
        ``heartbeat_ms`` (its heartbeat period, default 100); ``accel``
        may be ``"auto"``; ``incoming`` (e.g. ``"defer"``) starts a migration target, which
        is not waited for.
        """
        if not isinstance(spec, dict):
            raise LabError("vm_start: spec must be an object", spec=spec)
        fields = dict(spec)
        rate = fields.pop("rate_mib_s", 0)
        wss = fields.pop("wss_mib", DEFAULT_WSS_MIB)
        hb_ms = fields.pop("heartbeat_ms", DEFAULT_HEARTBEAT_MS)
        incoming = fields.pop("incoming", None)
        if not isinstance(rate, int) or not isinstance(wss, int) or rate < 0 or wss < 1:
            raise LabError("vm_start: rate_mib_s and wss_mib must be integers (>= 0, >= 1)",
                           rate_mib_s=rate, wss_mib=wss)
        if not valid_heartbeat_ms(hb_ms):
            raise LabError(f"vm_start: heartbeat_ms must be an integer {HEARTBEAT_MS_MIN}.."
                           f"{HEARTBEAT_MS_MAX}", heartbeat_ms=hb_ms)
        if incoming is not None and (not isinstance(incoming, str) or not incoming):
            raise LabError("vm_start: incoming must be a string such as 'defer'")
        if not isinstance(heartbeat_timeout, int | float) or heartbeat_timeout <= 0:
            raise LabError("vm_start: heartbeat_timeout must be a positive number")
        fields.setdefault("memory_mib", 256)
        fields.setdefault("vcpus", 1)
        if fields.get("accel", "auto") == "auto":
            fields["accel"] = await self.accel()
        which(QEMU_BINARY, "install qemu-system-x86 (scripts/setup.sh) on this host")
        if not all(k in fields for k in ("kernel", "initrd")):
            image = await ensure_guest_image()
            fields.setdefault("kernel", str(image.kernel))
            fields.setdefault("initrd", str(image.initrd))
            fields.setdefault("append", guest_append(rate, wss, extra=[f"labctl.hb_ms={hb_ms}"]))
        vmspec = self.checked_spec(fields, "vm_start")
        name = vmspec.name
        async with self._lock(name):
            self.check_not_running(name)
            vm = QemuVm(vmspec, self.state_dir / "vms" / name)
            vm.on_unexpected_exit = self._on_exit
            vm.on_event = self.on_vm_event
            self.vms[name] = vm
            try:
                await vm.start(incoming=incoming)
                if incoming is None:
                    await vm.wait_heartbeat(heartbeat_timeout)
            except BaseException:
                await vm.stop(timeout=5.0)
                raise
            log.info("started VM %s (pid %s, first heartbeat after %s s)", name, vm.pid,
                     vm.first_heartbeat_s)
            return {"name": name, "pid": vm.pid, "run_dir": str(vm.run_dir),
                    "first_heartbeat_s": vm.first_heartbeat_s, "accel": vmspec.accel}

    async def vm_stop(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        vm = self._vm(name)
        async with self._lock(name):
            await vm.stop(timeout=timeout)
            self.vms.pop(name, None)
        log.info("stopped VM %s (status %s)", name, vm.returncode)
        return {"name": name, "pid": vm.pid, "returncode": vm.returncode}

    async def vm_status(self, name: str) -> dict[str, Any]:
        vm = self._vm(name)
        state = vm.state.value
        if vm.state is VmState.RUNNING:
            try:
                state = str((await vm.query_status(timeout=5.0))["status"])
            except VmError as exc:
                state = f"unknown ({exc.message})"
        hb = vm.last_heartbeat
        return {
            "name": name, "state": state, "process": vm.state.value, "pid": vm.pid,
            "returncode": vm.returncode,
            "heartbeat": None if hb is None else {
                "counter": hb.counter, "age_s": round(time.monotonic() - hb.t, 3)},
            "disk_counter": vm.disk_counter,
            "first_heartbeat_s": vm.first_heartbeat_s,
            # for checks from outside labctl: a free QMP monitor and the console log
            "qmp_check_socket": str(vm.run_dir / "qmp-check.sock"),
            "console_log": str(vm.run_dir / "console.log"),
        }

    async def vm_list(self) -> list[dict[str, Any]]:
        return [await self.vm_status(name) for name in sorted(self.vms)]

    async def vm_console(self, name: str, command: str, timeout: float = 10.0) -> str:
        vm = self._vm(name)
        if not isinstance(command, str):
            raise LabError("vm_console: command must be a string")
        words = command.split()
        if not words or words[0] not in _CONSOLE_COMMANDS or (
                (len(words) != 2 or not words[1].isdigit()) if words[0] in ("rate", "wss")
                else len(words) != 1):
            raise LabError(f"vm_console: unknown command {command!r} (rate <MiB/s>, "
                           "wss <MiB>, read, sync, size)", command=command)
        return await vm.console_command(" ".join(words), _CONSOLE_COMMANDS[words[0]], timeout)

    async def vm_console_tail(self, name: str, lines: int = 50) -> list[str]:
        if not isinstance(lines, int) or not 0 < lines <= 2000:
            raise LabError("vm_console_tail: lines must be 1..2000")
        return self._vm(name).console_tail(lines)

    async def scan_luns(self, luns: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Read each LUN's NAA ID and size through libiscsi; remember them in the cache."""
        if not isinstance(luns, list):
            raise LabError("scan_luns: luns must be a list")
        sem = asyncio.Semaphore(4)

        async def one(entry: Any) -> dict[str, Any]:
            if not isinstance(entry, dict):
                return {"entry": entry, "ok": False, "error": "not an object"}
            out: dict[str, Any] = {k: entry.get(k) for k in
                                   ("portal", "target_iqn", "lun", "initiator_iqn")}
            try:
                args = (entry["portal"], entry["target_iqn"], entry["lun"],
                        entry["initiator_iqn"])
                async with sem:
                    naa = await iscsi.inquiry_naa(*args)
                    size = await iscsi.read_capacity(*args)
                out.update(naa=naa, size_bytes=size, ok=True, error=None)
            except KeyError as exc:
                out.update(naa=None, size_bytes=None, ok=False, error=f"missing {exc}")
            except LabError as exc:
                out.update(naa=None, size_bytes=None, ok=False, error=exc.message)
            out["scanned_at"] = time.time()
            key = f"{out['portal']}/{out['target_iqn']}/{out['lun']}"
            self.lun_cache[key] = out
            return out

        return list(await asyncio.gather(*(one(e) for e in luns)))

    async def get_lun_cache(self) -> list[dict[str, Any]]:
        return [self.lun_cache[k] for k in sorted(self.lun_cache)]

    # -- shutdown
    async def stop_all(self) -> None:
        """Stop every VM: softly (QMP quit), then hard (QemuVm.stop does both)."""
        await asyncio.gather(*(vm.stop(timeout=10.0) for vm in self.vms.values()),
                             return_exceptions=True)
        self.vms.clear()


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        portnum = int(port)
    except ValueError as exc:
        raise LabError(f"--listen wants IP:PORT, not {text!r}") from exc
    if not 0 < portnum < 65536:
        raise LabError(f"--listen: bad port {portnum}")
    return host, portnum


async def serve(lab_dir: Path, host: str, listen: str) -> None:
    agent = HostAgent(lab_dir, host)
    agent.state_dir.mkdir(parents=True, exist_ok=True)
    addr, port = parse_listen(listen)
    server = RpcServer(read_secret(lab_dir), agent.handlers(), name=f"host-agent {host}")
    agent.server = server
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pidfile = agent.state_dir / "agent.pid"
    await server.start(addr, port)
    pidfile.write_text(f"{os.getpid()}\n")
    log.info("host agent %s listening on %s:%d (pid %d)", host, addr, port, os.getpid())
    try:
        await stop.wait()
        log.info("host agent %s: stopping", host)
    finally:
        await server.close()
        await agent.stop_all()
        with contextlib.suppress(OSError):
            if pidfile.read_text().strip() == str(os.getpid()):
                pidfile.unlink()
        log.info("host agent %s: stopped", host)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labctl.agents.host", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab-dir", required=True, type=Path)
    ap.add_argument("--host", required=True)
    ap.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PORT}")
    args = ap.parse_args(argv)
    state = args.lab_dir / "hosts" / args.host
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"host agent: cannot create {state}: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(filename=state / "agent.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(args.lab_dir, args.host, args.listen))
    except LabError as exc:
        log.error("%s", exc)
        print(f"host agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
