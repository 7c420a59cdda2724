"""The test guest, QEMU control and the libiscsi wrappers.

Unit tests (no VM): cpio round trip, build_argv, VmSpec JSON form, tool-output parsers.
End-to-end (``-m e2e``): boot the real guest under QEMU with a local raw disk.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from labctl.core.errors import LabError, ProtocolError, VmError
from labctl.drivers import iscsi
from labctl.drivers.qemu import QemuVm, build_argv
from labctl.guest.image import (
    S_IFCHR,
    S_IFDIR,
    S_IFREG,
    CpioEntry,
    GuestImage,
    cpio_bytes,
    cpio_entries,
    ensure_guest_image,
)
from labctl.guest.protocol import boot_args, heartbeat_ms_of
from labctl.hosts.protocol import DEFAULT_MACHINE, FileDisk, IscsiDisk, VmSpec

HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64 is not installed "
                                "(run scripts/setup.sh)")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


# ---- unit ----------------------------------------------------------------------

def test_cpio_round_trip() -> None:
    entries = [
        CpioEntry("dev", S_IFDIR | 0o755),
        CpioEntry("dev/console", S_IFCHR | 0o600, rdevmajor=5, rdevminor=1),
        CpioEntry("init", S_IFREG | 0o755, b"\x7fELF" + bytes(range(256)) * 3),
        CpioEntry("a/odd-size", S_IFREG | 0o644, b"xyz"),
        CpioEntry("empty", S_IFREG | 0o644, b""),
    ]
    archive = cpio_bytes(entries)
    assert archive.startswith(b"070701")
    assert len(archive) % 512 == 0
    assert cpio_entries(archive) == entries


def _spec(disk: IscsiDisk | FileDisk | None) -> VmSpec:
    return VmSpec(name="vm1", memory_mib=256, vcpus=1, kernel=Path("/k/vmlinuz"),
                  initrd=Path("/k/initrd.img"), append=boot_args(20, 64), disk=disk)


def test_build_argv_iscsi(tmp_path: Path) -> None:
    disk = IscsiDisk("10.0.0.2:3260", "iqn.2003-01.org.linux-iscsi.lab:ds1", 3,
                     "iqn.2024-01.org.labctl:host1")
    argv = build_argv(_spec(disk), tmp_path)
    assert all(isinstance(a, str) for a in argv)
    assert "sh" not in argv and "-c" not in argv  # an argument list, never a shell
    joined = " ".join(argv)
    for piece in ("-nodefaults", "-no-user-config", "-display none", f"-machine {DEFAULT_MACHINE}",
                  "-accel tcg", "-cpu max", "-m 256", "-smp 1", "-serial chardev:con0",
                  "-mon chardev=qmp0,mode=control", "-device virtio-blk-pci,drive=disk0,id=vda"):
        assert piece in joined, piece
    assert argv[argv.index("-append") + 1] == boot_args(20, 64)
    bd = argv[argv.index("-blockdev") + 1]
    assert bd == ("driver=iscsi,transport=tcp,portal=10.0.0.2:3260,"
                  "target=iqn.2003-01.org.linux-iscsi.lab:ds1,lun=3,"
                  "initiator-name=iqn.2024-01.org.labctl:host1,node-name=disk0,cache.direct=on")
    assert f"path={tmp_path}/qmp.sock" in joined
    assert f"logfile={tmp_path}/console.log" in joined
    assert "-incoming" not in argv and "-mem-prealloc" not in argv
    assert disk.url == "iscsi://10.0.0.2:3260/iqn.2003-01.org.linux-iscsi.lab:ds1/3"


def test_build_argv_file_disk_incoming_and_escaping(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    argv = build_argv(_spec(FileDisk(odd / "disk.raw")), odd, incoming="defer")
    bd = argv[argv.index("-blockdev") + 1]
    assert bd.startswith(f"driver=file,filename={tmp_path}/a,,b/disk.raw,node-name=disk0")
    assert argv[argv.index("-incoming") + 1] == "defer"
    assert "-mem-prealloc" in argv  # a migration target faults its RAM in before the stream
    assert argv[argv.index("-pidfile") + 1] == str(odd / "qemu.pid")  # not an option string


def test_build_argv_no_disk_and_long_paths(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    argv = build_argv(_spec(None), deep)
    assert "-blockdev" not in argv and "-device" not in argv
    assert "socket,id=qmp0,path=qmp.sock," in " ".join(argv)  # relative: QEMU runs in run_dir


def test_vmspec_json_round_trip_and_validation() -> None:
    for disk in (None, FileDisk(Path("/d/x.raw")),
                 IscsiDisk("10.0.0.2:3260", "iqn.2003-01.org.x:t", 0, "iqn.2024-01.org.y:h",
                           "naa.6001405abc")):
        spec = _spec(disk)
        assert VmSpec.from_wire(spec.to_wire()) == spec
    with pytest.raises(ProtocolError, match="bad VM name"):
        VmSpec.from_wire({**_spec(None).to_wire(), "name": "bad name; rm -rf /"})
    with pytest.raises(ProtocolError, match="unknown field 'surprise'"):
        VmSpec.from_wire({**_spec(None).to_wire(), "surprise": 1})
    with pytest.raises(ProtocolError, match="memory_mib: expected int"):
        VmSpec.from_wire({**_spec(None).to_wire(), "memory_mib": "256"})
    with pytest.raises(ProtocolError, match="missing field 'kernel'"):
        VmSpec.from_wire({k: v for k, v in _spec(None).to_wire().items() if k != "kernel"})
    with pytest.raises(ValueError):
        IscsiDisk("10.0.0.2:3260,evil=1", "iqn.2003-01.org.x:t", 0, "iqn.2024-01.org.y:h")


def test_heartbeat_period_from_the_command_line() -> None:
    assert heartbeat_ms_of(boot_args(10, 64)) == 100  # the default
    assert heartbeat_ms_of(boot_args(10, 64, extra=["labctl.hb_ms=20"])) == 20
    assert heartbeat_ms_of("labctl.hb_ms=5 quiet") == 100  # out of range: the guest's default
    assert heartbeat_ms_of("labctl.hb_ms=1001") == 100
    assert heartbeat_ms_of("xlabctl.hb_ms=20") == 100


def test_iscsi_parsers() -> None:
    found = [iscsi.Designator(type=1, association=0, code_set=2, hex="4c494f", text="LIO"),
             iscsi.Designator(type=3, association=0, code_set=1,
                              hex="6001405ABCDEF0000000000000000001", text=None),
             iscsi.Designator(type=3, association=1, code_set=1, hex="5000000000000001",
                              text=None)]
    assert iscsi.naa_from_designators(found) == "naa.6001405abcdef0000000000000000001"
    with pytest.raises(LabError, match="no NAA designator"):
        iscsi.naa_from_designators(found[:1])


# ---- end to end ----------------------------------------------------------------

@pytest.fixture(scope="module")
def image() -> GuestImage:
    if not HAVE_QEMU or shutil.which("gcc") is None:
        pytest.skip("qemu-system-x86_64 or gcc is not installed (run scripts/setup.sh)")
    return asyncio.run(ensure_guest_image())


@pytest.fixture
def raw_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    yield disk


async def _boot(image: GuestImage, run_dir: Path, disk: Path | None, rate: int = 0,
                wss: int = 64, extra: tuple[str, ...] = ()) -> QemuVm:
    spec = VmSpec(name="guest-test", memory_mib=256, vcpus=1, kernel=image.kernel,
                  initrd=image.initrd, append=boot_args(rate, wss, extra=extra),
                  disk=FileDisk(disk) if disk else None)
    vm = QemuVm(spec, run_dir)
    try:
        await vm.start()
        await vm.wait_heartbeat(60)
    except BaseException:
        await vm.stop()
        raise
    return vm


@pytest.mark.e2e
@needs_qemu
@needs_gcc
def test_guest_heartbeat_console_and_disk_counter(image: GuestImage, raw_disk: Path,
                                                   tmp_path: Path) -> None:
    async def scenario() -> None:
        vm = await _boot(image, tmp_path / "run1", raw_disk)
        try:
            assert any(ln.text == "DISK boot 0" for ln in vm.lines)
            assert any(ln.text == "READY" for ln in vm.lines)
            first = vm.last_heartbeat
            assert first is not None
            for _ in range(25):
                await vm.wait_heartbeat(5)
            hbs = [ln for ln in vm.lines if ln.text.startswith("HB ")]
            counters = [int(ln.text.split()[1]) for ln in hbs]
            assert counters == list(range(counters[0], counters[0] + len(counters)))
            gaps = [b.t - a.t for a, b in itertools.pairwise(hbs[1:])]
            assert 0.08 < statistics.median(gaps) < 0.12, gaps
            assert 0.09 < (hbs[-1].t - hbs[1].t) / (len(hbs) - 2) < 0.11  # no drift
            assert await vm.console_command("rate 20", "OK rate") == "OK rate 20"
            assert await vm.console_command("wss 32", "OK wss") == "OK wss 32"
            with pytest.raises(VmError, match="ERR frobnicate"):
                await vm.console_command("frobnicate", "OK")
            d1 = vm.disk_counter
            assert d1 is not None and d1 >= 2  # written once a second
            await asyncio.sleep(2.2)
            assert vm.disk_counter is not None and vm.disk_counter >= d1 + 2
            wrote = await vm.console_command("sync", "DISK wrote")
            latest = int(wrote.split()[2])
            read = await vm.console_command("read", "DISK read")
            assert int(read.split()[2]) in (latest, latest + 1)  # a tick may land between
            status = await vm.query_status()
            assert status["status"] == "running"
        finally:
            await vm.stop()
        assert vm.returncode is not None
        last = vm.disk_counter
        assert last is not None
        # a new QEMU on the same disk continues the counter
        vm2 = await _boot(image, tmp_path / "run2", raw_disk)
        try:
            boot = [ln.text for ln in vm2.lines if ln.text.startswith("DISK boot")]
            assert boot == [f"DISK boot {last}"], boot
            for _ in range(12):
                hb = await vm2.wait_heartbeat(5)
            assert hb.disk_counter is not None and hb.disk_counter > last
        finally:
            await vm2.stop()

    asyncio.run(scenario())


@pytest.mark.e2e
@needs_qemu
@needs_gcc
def test_guest_without_disk_and_qemu_death_is_reported(image: GuestImage, tmp_path: Path) -> None:
    async def scenario() -> None:
        vm = await _boot(image, tmp_path / "run", None)
        try:
            assert any(ln.text == "DISK none" for ln in vm.lines)
            assert vm.last_heartbeat is not None and vm.last_heartbeat.disk_counter is None
            with pytest.raises(VmError):
                await vm.console_command("read", "DISK read")  # no disk: ERR read
            assert vm._proc is not None
            vm._proc.kill()  # QEMU dies under us: waiting must fail with evidence
            with pytest.raises(VmError) as info:
                await vm.wait_heartbeat(5)
            assert info.value.evidence["console_tail"]
        finally:
            await vm.stop()

    asyncio.run(scenario())


async def _dirty_rate(vm: QemuVm) -> float:
    await vm.execute("calc-dirty-rate", {"calc-time": 1, "sample-pages": 8192})
    for _ in range(60):
        await asyncio.sleep(0.25)
        res = await vm.execute("query-dirty-rate")
        if res["status"] == "measured":
            return float(res["dirty-rate"])
    raise AssertionError(f"calc-dirty-rate never finished: {res}")


@pytest.mark.e2e
@needs_qemu
@needs_gcc
def test_guest_dirty_rate_is_real(image: GuestImage, tmp_path: Path) -> None:
    async def scenario() -> None:
        vm = await _boot(image, tmp_path / "run", None, rate=0, wss=64)
        try:
            idle = await _dirty_rate(vm)
            await vm.console_command("rate 20", "OK rate")
            await asyncio.sleep(0.3)
            busy = await _dirty_rate(vm)
            assert busy >= 8, (idle, busy)
            assert busy >= 4 * max(idle, 1), (idle, busy)
        finally:
            await vm.stop()

    asyncio.run(scenario())


def _beats_in(vm: QemuVm, t0: float, t1: float) -> int:
    return sum(1 for ln in list(vm.lines) if ln.text.startswith("HB ") and t0 <= ln.t < t1)


@pytest.mark.e2e
@needs_qemu
@needs_gcc
def test_guest_heartbeat_period_from_the_command_line(image: GuestImage, raw_disk: Path,
                                                       tmp_path: Path) -> None:
    """labctl.hb_ms=20: about five beats per 100 ms (counted over a 3 s window, loose bounds);
    the disk record still once a second; ``hb`` changes the period at run time."""
    async def scenario() -> None:
        vm = await _boot(image, tmp_path / "run", raw_disk, rate=10, extra=("labctl.hb_ms=20",))
        try:
            await asyncio.sleep(1.0)  # past the boot
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.sleep(3.0)
            t1 = loop.time()
            n = _beats_in(vm, t0, t1)
            # 150 expected; the default period would give 30
            assert 75 <= n <= 200, n
            hbs = [int(ln.text.split()[1]) for ln in vm.lines if ln.text.startswith("HB ")]
            assert hbs == list(range(hbs[0], hbs[0] + len(hbs)))  # every beat, in order
            d1 = vm.disk_counter
            assert d1 is not None and 2 <= d1 <= 8, d1  # ~4 s up: once a second, not per 10 beats
            assert await vm.console_command("rate 20", "OK rate") == "OK rate 20"
            assert await vm.console_command("size", "DISK size") == f"DISK size {1 << 20}"
            assert await vm.console_command("hb 200", "OK hb") == "OK hb 200"
            await asyncio.sleep(0.5)
            t2 = loop.time()
            await asyncio.sleep(3.0)
            n2 = _beats_in(vm, t2, loop.time())
            assert 8 <= n2 <= 25, n2  # 15 expected at 200 ms, 150 at 20 ms
            for bad in ("hb 5", "hb 1001", "hb x"):
                with pytest.raises(VmError, match="ERR hb"):
                    await vm.console_command(bad, "OK hb")
            read = await vm.console_command("read", "DISK read")
            assert int(read.split()[2]) >= d1
        finally:
            await vm.stop()

    asyncio.run(scenario())
