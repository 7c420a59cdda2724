"""How long a host agent waits for a guest's first heartbeat: longer only for TCG on a host
whose own CPU QEMU emulates (TCG inside TCG), judged by /proc/cpuinfo."""

from __future__ import annotations

from pathlib import Path

from labctl.hosts.accel import NESTED_TCG_SLOWDOWN, boot_wait

EMULATED = "processor\t: 0\nmodel name\t: QEMU Virtual CPU version 2.5+\nflags\t: fpu hypervisor\n"
REAL = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t: fpu hypervisor svm\n"


def test_only_tcg_under_an_emulated_cpu_waits_longer(tmp_path: Path) -> None:
    emulated, real = tmp_path / "emulated", tmp_path / "real"
    emulated.write_text(EMULATED)
    real.write_text(REAL)
    assert boot_wait("tcg", 60, emulated) == 60 * NESTED_TCG_SLOWDOWN
    assert boot_wait("kvm", 60, emulated) == 60
    # a VM on a real CPU (the hypervisor flag alone) is not TCG inside TCG
    assert boot_wait("tcg", 60, real) == 60
    assert boot_wait("tcg", 60, tmp_path / "missing") == 60
