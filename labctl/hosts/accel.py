"""Which accelerator this host really has: KVM only when a probe boots the test guest under
``-accel kvm`` and sees its heartbeat (a /dev/kvm that exists may still hang a guest).
Agent side: each host agent probes its own machine."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
from pathlib import Path

from labctl.core.errors import LabError
from labctl.drivers.qemu import QemuVm
from labctl.guest.image import ensure_guest_image
from labctl.guest.protocol import boot_args
from labctl.hosts import accelcache
from labctl.hosts.protocol import VmSpec

log = logging.getLogger(__name__)

_kvm_lock = threading.Lock()
_kvm_answer: bool | None = None

#: how much longer a TCG guest takes to boot on a host whose own CPU QEMU emulates (a
#: Vagrant host on a machine without KVM: TCG inside TCG took 123 s to reach the test
#: guest's init, against about 5 s with one level of TCG)
NESTED_TCG_SLOWDOWN = 5.0


def emulated_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this host's CPU is one QEMU emulates (TCG: ``QEMU Virtual CPU``, ``QEMU TCG
    CPU``), not a real CPU passed through."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("model name") and "QEMU" in line for line in text.splitlines())


def boot_wait(accel: str, base: float, cpuinfo: Path = Path("/proc/cpuinfo")) -> float:
    """How long to wait for a guest's first heartbeat: ``base`` seconds, longer for TCG on
    a host that is itself under TCG."""
    return base * NESTED_TCG_SLOWDOWN if accel == "tcg" and emulated_cpu(cpuinfo) else base


def kvm_usable(timeout: float = 10.0) -> bool:
    """Whether ``-accel kvm`` really runs the test guest here: boots it with KVM and waits
    for its first heartbeat. The answer is cached per process and per host boot (a file
    under the cache); the first call blocks for up to ``timeout`` seconds, so call it from a
    thread (``asyncio.to_thread``) in async code."""
    global _kvm_answer
    with _kvm_lock:
        if _kvm_answer is not None:
            return _kvm_answer
        try:
            fd = os.open("/dev/kvm", os.O_RDWR)
            os.close(fd)
        except OSError:
            _kvm_answer = False
            return False
        known = accelcache.cached()
        if known is not None:
            _kvm_answer = known
            return known
        try:  # callers run this in a thread of its own, which has no event loop
            _kvm_answer = bool(asyncio.run(_probe_kvm(timeout)))
        except Exception:  # a probe that cannot even run means "not usable"
            log.exception("KVM probe failed")
            _kvm_answer = False
        accelcache.remember(_kvm_answer)
        return _kvm_answer


async def _probe_kvm(timeout: float) -> bool:
    image = await ensure_guest_image()
    with tempfile.TemporaryDirectory(prefix="labctl-kvm-") as tmp:
        spec = VmSpec(name="kvm-probe", memory_mib=128, vcpus=1, kernel=image.kernel,
                      initrd=image.initrd, append=boot_args(0, 8), accel="kvm")
        vm = QemuVm(spec, Path(tmp))
        try:
            await vm.start(timeout=timeout)
            await vm.wait_heartbeat(timeout)
            return True
        except LabError as exc:
            log.info("KVM probe: not usable here (%s)", exc)
            return False
        finally:
            await vm.stop(timeout=2.0)
