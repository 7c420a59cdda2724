#!/usr/bin/python3 -Su
"""PID 1 of the labctl storage node and WAN router (standard library only).

Stable on purpose: it lives in the cached base image, while the storage agent
comes from the lab's config disk. Under TCG every fork/exec costs ~0.1 s, so it
does everything in-process: mounts and module loads through libc, the network
address through ioctls. Steps:

1. mount proc, sys, devtmpfs, a tmpfs on /run;
2. load the modules listed in /etc/labctl-storage/modules (finit_module),
   then mount configfs;
3. find the config disk (virtio serial ``labctl-config``), mount it read-only;
4. bring up the interface and its address from config.json;
5. fork: the child imports the agent the config names (``agent``: the storage agent
   unless it says ``labctl.agents.router``) from the config disk and runs it; PID 1
   stays behind and reaps every orphan until the agent ends.

The agent is not PID 1 itself because PID 1 must reap with ``waitpid(-1)``: in the
agent's own process that takes the exit status of a program the agent is waiting for
(asyncio then reports exit status 255, and ``rpc.nfsd`` seemed to fail after a restart).
As PID 1's grandchildren the agent's programs are never PID 1's to reap.

A fatal error is printed to the console and the machine powers off, so the
controller sees a dead domain plus the reason in the console log.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

CONFIG_SERIAL = "labctl-config"
CONFIG_MOUNT = "/run/labctl/config"
MODULE_LIST = "/etc/labctl-storage/modules"
MODULE_DIR = "/lib/modules"
AGENTS = ("labctl.agents.storage", "labctl.agents.router")

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
RB_POWER_OFF = 0x4321FEDC
SYS_FINIT_MODULE = 313  # x86_64

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.reboot.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


class InitError(Exception):
    """A step of bring-up failed; the message says which and why."""


def say(msg: str) -> None:
    sys.stdout.write(f"labctl-storage: {msg}\n")
    sys.stdout.flush()


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                     data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        if err == errno.EBUSY:  # already mounted
            return
        raise InitError(f"mount -t {fstype} {source} {target}: {os.strerror(err)}")


def load_modules() -> list[str]:
    """finit_module every listed module in order; already loaded is fine."""
    loaded: list[str] = []
    try:
        with open(MODULE_LIST) as f:
            rels = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise InitError(f"{MODULE_LIST} is missing: the image is incomplete") from None
    release = os.uname().release
    for rel in rels:
        path = os.path.join(MODULE_DIR, release, rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise InitError(f"cannot open module {path}: {exc} (kernel {release})") from None
        try:
            rc = _libc.syscall(SYS_FINIT_MODULE, fd, b"", 0)
            err = ctypes.get_errno() if rc != 0 else 0
        finally:
            os.close(fd)
        if rc != 0 and err != errno.EEXIST:
            raise InitError(f"loading {rel} failed: {os.strerror(err)}")
        loaded.append(os.path.basename(rel))
    return loaded


def find_config_disk(timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            names = sorted(os.listdir("/sys/block"))
        except FileNotFoundError:
            names = []
        for name in names:
            if not name.startswith("vd"):
                continue
            try:
                with open(f"/sys/block/{name}/serial") as f:
                    if f.read().strip() == CONFIG_SERIAL:
                        return f"/dev/{name}"
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise InitError(f"no virtio disk with serial {CONFIG_SERIAL!r} (have {names})")
        time.sleep(0.05)


def _ifreq_addr(ifname: str, addr: str) -> bytes:
    return struct.pack("16sH2s4s8s", ifname.encode(), socket.AF_INET, b"\0\0",
                       socket.inet_aton(addr), b"\0" * 8)


def _sockaddr(addr: str) -> bytes:
    return struct.pack("H2s4s8s", socket.AF_INET, b"\0\0", socket.inet_aton(addr), b"\0" * 8)


def _link_up(sock: socket.socket, ifname: str) -> None:
    import fcntl

    req = struct.pack("16sH14s", ifname.encode(), 0, b"\0" * 14)
    flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
    fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", ifname.encode(), flags | IFF_UP,
                                                b"\0" * 14))


def pick_interface(mac: str | None, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        names = [n for n in sorted(os.listdir("/sys/class/net")) if n != "lo"]
        for name in names:
            if mac is None:
                return name
            with open(f"/sys/class/net/{name}/address") as f:
                if f.read().strip().lower() == mac.lower():
                    return name
        if time.monotonic() > deadline:
            raise InitError(f"no network interface with MAC {mac} (have {names})")
        time.sleep(0.05)


def configure_network(config: dict[str, Any]) -> str:
    import fcntl

    address = str(config["address"])
    ip, _, plen = address.partition("/")
    prefix = int(plen or "24")
    netmask = socket.inet_ntoa(struct.pack(">I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    mac = config.get("mac")
    ifname = pick_interface(str(mac) if mac else None)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            _link_up(sock, "lo")
            fcntl.ioctl(sock, SIOCSIFADDR, _ifreq_addr(ifname, ip))
            fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq_addr(ifname, netmask))
            _link_up(sock, ifname)
            gateway = config.get("gateway")
            if gateway:
                # struct rtentry (x86_64): pad, dst, gateway, genmask, flags, ..., dev
                rt = struct.pack("<Q16s16s16sHh4xQQh6xQQH6x", 0, _sockaddr("0.0.0.0"),
                                 _sockaddr(str(gateway)), _sockaddr("0.0.0.0"),
                                 RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0)
                fcntl.ioctl(sock, SIOCADDRT, rt)
        except OSError as exc:
            raise InitError(f"configuring {ifname} with {address}: {exc}") from None
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(str(config.get("node", "storage")))
    return ifname


async def run_agent(config: dict[str, Any]) -> None:
    sys.path.insert(0, os.path.join(CONFIG_MOUNT, "python"))
    import importlib

    name = str(config.get("agent", "labctl.agents.storage"))
    if name not in AGENTS:
        raise InitError(f"unknown agent {name!r} (known: {', '.join(AGENTS)})")
    agent = importlib.import_module(name)
    await agent.serve(config, on_ready=lambda: say(f"ready {uptime():.2f}"))
    raise InitError(f"{name} stopped serving")


def supervise(target: Callable[[], object]) -> int:
    """Run ``target`` in a child process and reap every process that ends meanwhile (as
    PID 1, every orphan of the machine) until that child ends; return its wait status.

    A failure in the child is printed to the console there; the child then exits 1."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target()
        except BaseException as exc:
            traceback.print_exc()
            sys.stdout.write(f"\nlabctl-storage: agent: {type(exc).__name__}: {exc}\n")
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)  # never back into PID 1's code
    while True:
        try:
            got, status = os.wait()
        except ChildProcessError:  # no child at all: its status was taken elsewhere
            raise InitError(f"the agent (pid {pid}) ended and its status was lost") from None
        if got == pid:
            return status


def power_off(reason: str) -> NoReturn:
    sys.stdout.write(f"\nlabctl-storage: FATAL: {reason}\nlabctl-storage: powering off\n")
    sys.stdout.flush()
    os.sync()
    _libc.reboot(RB_POWER_OFF)
    while True:  # PID 1 must never return
        time.sleep(3600)


def main() -> None:
    if "/usr/lib/python3/dist-packages" not in sys.path:  # -S skipped site
        sys.path.append("/usr/lib/python3/dist-packages")
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID)
        mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        say(f"init at {uptime():.2f}")
        mods = load_modules()
        mount("configfs", "/sys/kernel/config", "configfs")
        say(f"{len(mods)} modules loaded at {uptime():.2f}")
        disk = find_config_disk()
        mount(disk, CONFIG_MOUNT, "ext4", MS_RDONLY | MS_NOSUID | MS_NODEV)
        with open(os.path.join(CONFIG_MOUNT, "config.json")) as f:
            config: dict[str, Any] = json.load(f)
        ifname = configure_network(config)
        say(f"{ifname} has {config['address']} at {uptime():.2f}")
        status = supervise(lambda: asyncio.run(run_agent(config)))
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.waitstatus_to_exitcode(status)}")
        raise InitError(f"the agent ended ({how})")
    except BaseException as exc:  # PID 1 turns every failure into a power-off
        traceback.print_exc()
        power_off(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
