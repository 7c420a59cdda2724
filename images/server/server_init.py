#!/usr/bin/python3 -Su
"""PID 1 of the labctl server guest: a small Debian server whose disk a replication moves
between clouds (standard library only).

What a cloud's instance metadata would give it comes on the kernel command line, as a
cloud operator's boot configuration: ``labctl.vm=NAME`` (hostname), ``labctl.ip=A/P``,
``labctl.gw=G``, ``labctl.mac=M`` (which interface), ``labctl.key=K`` (the operator's SSH
public key, base64url of its one line), ``labctl.hb_ms=N`` (heartbeat period). Steps:

1. mount proc, sys, devtmpfs, /run, /dev/pts; load the modules listed in
   /etc/labctl-server/modules (the shared helpers of the storage node's PID 1); name the
   device-mapper map the initramfs put the root disk under ``/dev/mapper/root``, and grow
   the filesystem when the disk is larger (a clone made larger than the image);
2. the interface and its address; the hostname;
3. root's authorized_keys from ``labctl.key`` (replaced: the key is the operator's);
4. the SSH host key made on first boot (kept on the disk: a replica is the same server)
   and its public half printed on the console (``labctl-server: hostkey ssh-ed25519 ..``);
5. sshd, started again if it dies; a heartbeat line (``HB <n> -1``) on the console every
   ``labctl.hb_ms`` ms, which a host agent follows as it follows its test guest's;
6. SIGTERM (``kill 1`` over SSH, as a stop request) or SIGINT: every process is stopped,
   the disk synced and remounted read-only, the machine powered off.

A fatal error is printed to the console and the machine powers off.
"""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
import time
import traceback

sys.path.insert(0, "/usr/lib/labctl")
import initlib  # the storage node's PID 1, used as a library

MODULE_LIST = "/etc/labctl-server/modules"
SSHD = "/usr/sbin/sshd"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
_stop = False


def say(msg: str) -> None:
    sys.stdout.write(f"labctl-server: {msg}\n")
    sys.stdout.flush()


def cmdline() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        words = f.read().split()
    return {k[len("labctl."):]: v for k, _, v in (w.partition("=") for w in words)
            if k.startswith("labctl.")}


def authorize(key_b64: str) -> None:
    key = base64.urlsafe_b64decode(key_b64 + "=" * (-len(key_b64) % 4)).decode().strip()
    if not key.startswith("ssh-") or "\n" in key:
        raise initlib.InitError("labctl.key is not one SSH public key line")
    os.makedirs("/root/.ssh", mode=0o700, exist_ok=True)
    try:
        with open("/root/.ssh/authorized_keys") as f:
            if f.read() == key + "\n":
                return  # already there: a boot on a full filesystem writes nothing
    except OSError:
        pass
    tmp = "/root/.ssh/authorized_keys.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, "/root/.ssh/authorized_keys")


def host_key() -> None:
    """Make the host key on first boot; print its public half on the console, where the
    operator pins it before the first SSH connection (as a cloud's console output)."""
    if not os.path.exists(HOST_KEY):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", HOST_KEY],
                       check=True)
        os.sync()
    with open(HOST_KEY + ".pub") as f:
        say("hostkey " + " ".join(f.read().split()[:2]))


def name_root_map() -> None:
    """``/dev/mapper/root``: the device-mapper map of the root disk the initramfs made (where
    the replication agent's write tracker goes), as dmsetup would name it without udev."""
    for dm in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{dm}/dm/name") as f:
                if f.read().strip() != "root":
                    continue
        except OSError:
            continue
        os.makedirs("/dev/mapper", mode=0o755, exist_ok=True)
        if not os.path.exists("/dev/mapper/root"):
            os.mknod("/dev/mapper/root", 0o600 | stat.S_IFBLK, os.stat(f"/dev/{dm}").st_rdev)
        say(f"root disk under device-mapper as /dev/mapper/root ({dm})")
        grow("/dev/mapper/root")
        return
    say("root disk not under device-mapper (no initramfs): no write tracking")


def grow(device: str) -> None:
    """A disk larger than its filesystem (a clone made larger than the image): the
    filesystem grown online to fill it."""
    fs = os.statvfs("/")
    fd = os.open(device, os.O_RDONLY)
    try:
        disk = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if disk - fs.f_blocks * fs.f_frsize < 64 << 20:
        return
    try:  # PID 1 has no PATH: the tool by its path; a failure leaves the filesystem as it is
        ran = subprocess.run(["/sbin/resize2fs", device], capture_output=True, text=True,
                             check=False)
    except OSError as exc:
        say(f"resize2fs failed: {exc}")
        return
    say(f"filesystem grown to the disk's {disk >> 20} MiB at {initlib.uptime():.2f}"
        if ran.returncode == 0 else f"resize2fs failed: {ran.stderr.strip()}")


def start_sshd() -> subprocess.Popen[bytes]:
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    return subprocess.Popen([SSHD, "-D", "-e", "-o", f"HostKey={HOST_KEY}"],
                            stdout=subprocess.DEVNULL, stderr=open("/run/sshd.log", "ab"))


def _on_signal(_sig: int, _frame: object) -> None:
    global _stop
    _stop = True


def shut_down(children: list[subprocess.Popen[bytes]]) -> None:
    say("stopping")
    for p in children:
        if p.poll() is None:
            p.terminate()
    os.kill(-1, signal.SIGTERM)  # every process but PID 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.1)
        except ChildProcessError:
            break
    os.kill(-1, signal.SIGKILL)
    os.sync()
    initlib._libc.mount(b"/", b"/", None, initlib.MS_RDONLY | 0x20, None)  # MS_REMOUNT
    os.sync()
    say("powering off")
    initlib._libc.reboot(initlib.RB_POWER_OFF)
    while True:
        time.sleep(3600)


def main() -> None:
    initlib.MODULE_LIST = MODULE_LIST
    try:
        initlib.mount("proc", "/proc", "proc", initlib.MS_NOSUID | initlib.MS_NODEV)
        initlib.mount("sysfs", "/sys", "sysfs", initlib.MS_NOSUID | initlib.MS_NODEV)
        initlib.mount("devtmpfs", "/dev", "devtmpfs", initlib.MS_NOSUID)
        initlib.mount("devpts", "/dev/pts", "devpts", initlib.MS_NOSUID, "mode=620,ptmxmode=666")
        initlib.mount("tmpfs", "/run", "tmpfs", initlib.MS_NOSUID | initlib.MS_NODEV, "mode=0755")
        say(f"init at {initlib.uptime():.2f}")
        initlib.load_modules()
        name_root_map()
        args = cmdline()
        name = args.get("vm", "server")
        if "ip" in args:
            ifname = initlib.configure_network({"address": args["ip"], "gateway": args.get("gw"),
                                                "mac": args.get("mac"), "node": name})
            say(f"{ifname} has {args['ip']} at {initlib.uptime():.2f}")
        else:
            with open("/proc/sys/kernel/hostname", "w") as f:
                f.write(name)
        if "key" in args:
            authorize(args["key"])
        host_key()
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        sshd = start_sshd()
        say(f"sshd started at {initlib.uptime():.2f}")
        period = max(10, min(int(args.get("hb_ms", "1000")), 1000)) / 1000
        n = 0
        while not _stop:
            if sshd.poll() is not None:
                say(f"sshd exited ({sshd.returncode}): starting it again")
                sshd = start_sshd()
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
            n += 1
            sys.stdout.write(f"HB {n} -1\n")
            sys.stdout.flush()
            time.sleep(period)
        shut_down([sshd])
    except BaseException as exc:  # PID 1 turns every failure into a power-off
        traceback.print_exc()
        initlib.power_off(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
