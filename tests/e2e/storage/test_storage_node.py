"""The storage node: unit tests of its pure parts, and end to end on a real VM.

The e2e tests boot the storage node VM through libvirt (TCG), put it on a
bridge with two network namespaces as fake hosts, and check with libiscsi's own
tools, from inside the namespaces, that the LUN has the NAA ID and size the
agent reports, that only the named initiator may log in, and that a resize of
the backing virtio disk shows through LIO.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import secrets
import shutil
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from labctl.core.chap import chap_for
from labctl.core.errors import AuthenticationFailed, ImageBuildError, LabError, StorageNodeError
from labctl.core.ids import naa_from_unit_serial
from labctl.core.proc import run
from labctl.core.wire import Empty
from labctl.drivers import iscsi
from labctl.drivers.debian import make_config_disk
from labctl.drivers.lio import find_disk_by_serial
from labctl.storage import agent
from labctl.storage.domains import LIBVIRT_QEMU_LOGS
from labctl.storage.image import StorageImage
from labctl.storage.protocol import NodeConfig
from tests.conftest import NO_ACL, NO_LUN, free_subnet

# --- unit tests (no VM) -------------------------------------------------------------------


def test_naa_from_unit_serial_matches_lio() -> None:
    # observed on the wire from LIO (VPD 0x83) for this serial
    assert naa_from_unit_serial("0123456789abcdef0123456789abcdef") == (
        "60014050123456789abcdef012345678")
    # only hex digits count, the rest is skipped; short serials are zero-filled
    assert naa_from_unit_serial("ab-cd") == "6001405abcd" + "0" * 21
    assert naa_from_unit_serial("f" * 32, company_id=0xABCDEF) == "6abcdef" + "f" * 25
    with pytest.raises(ValueError):
        naa_from_unit_serial("00", company_id=1 << 24)


def test_input_checks() -> None:
    assert agent.check_unit_serial("ABCDEF0123456789abcdef0123456789") == (
        "abcdef0123456789abcdef0123456789")
    for bad in ("", "xyz", "0" * 31, "0" * 33, "g" * 32):
        with pytest.raises(StorageNodeError):
            agent.check_unit_serial(bad)
    assert agent.check_initiators(["iqn.2025-01.lab:B", "iqn.2025-01.lab:a", "iqn.2025-01.lab:b"]) \
        == ["iqn.2025-01.lab:a", "iqn.2025-01.lab:b"]
    with pytest.raises(StorageNodeError):
        agent.check_initiators(["not an iqn"])
    for bad_name in ("", "a/b", "a b", "-x", "x" * 65):
        with pytest.raises(StorageNodeError):
            agent.check_lun_name(bad_name)


def test_find_disk_by_serial(tmp_path: Path) -> None:
    for dev, serial in (("vda", "labctl-config"), ("vdb", "lc-ds1"), ("vdc", "lc-ds2")):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "serial").write_text(serial + "\n")
    assert find_disk_by_serial("lc-ds2", tmp_path) == "/dev/vdc"
    with pytest.raises(StorageNodeError) as err:
        find_disk_by_serial("lc-zz", tmp_path)
    assert err.value.evidence["disks"] == {"vda": "labctl-config", "vdb": "lc-ds1",
                                           "vdc": "lc-ds2"}


def test_agent_without_lio_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("rtslib_fb")

    def no_configfs() -> None:
        raise FileNotFoundError(2, "No such file or directory", "/proc/modules")

    fake.RTSRoot = no_configfs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rtslib_fb", fake)
    a = agent.StorageAgent(NodeConfig(lab="l", node="s", address="10.0.0.2/24", gateway=None,
                                      mac="52:54:00:00:00:01", secret="00" * 32,
                                      target_iqn="iqn.2025-01.lab:s"))
    with pytest.raises(StorageNodeError, match="LIO is not available on this kernel"):
        asyncio.run(a.status(Empty()))


def test_bad_agent_config_is_refused() -> None:
    with pytest.raises(StorageNodeError, match=r"bad storage agent config.*missing field 'secret'"):
        asyncio.run(agent.serve({"lab": "l", "node": "s", "address": "10.0.0.2/24",
                                 "gateway": None, "mac": "m", "target_iqn": "iqn.2025-01.lab:s"}))


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
                    reason="e2fsprogs (mkfs.ext4, debugfs) not installed")
def test_make_config_disk(tmp_path: Path) -> None:
    disk = tmp_path / "config.img"
    files = {"config.json": b'{"node": "s1"}', "python/labctl/__init__.py": b"# hi\n"}
    asyncio.run(make_config_disk(disk, files))
    assert disk.stat().st_size == 8 << 20
    assert disk.stat().st_mode & 0o777 == 0o600  # it carries the lab secret
    out = subprocess.run(["debugfs", "-R", "cat /config.json", str(disk)],
                         capture_output=True, check=True)
    assert out.stdout == b'{"node": "s1"}'
    out = subprocess.run(["debugfs", "-R", "cat /python/labctl/__init__.py", str(disk)],
                         capture_output=True, check=True)
    assert out.stdout == b"# hi\n"
    with pytest.raises(ImageBuildError):
        asyncio.run(make_config_disk(tmp_path / "bad.img", {"../escape": b""}))


def test_domain_xml(tmp_path: Path) -> None:
    from labctl.storage import node as sn

    spec = sn.StorageNodeSpec(
        lab="l1", name="st1", address_cidr="10.9.0.2/24", bridge="br0", tap="lctap0",
        mac="52:54:00:00:00:02", lab_dir=tmp_path, secret=b"k" * 32,
        target_iqn="iqn.2025-01.lab:st1",
        data_disks=[sn.DataDisk("lc-ds1", tmp_path / "a.img", 1 << 26)])
    image = StorageImage(kernel=Path("/k/vmlinuz"), rootfs=Path("/k/rootfs.ext4"),
                         recipe_hash="x")
    xml = sn.domain_xml(spec, image, tmp_path / "root.qcow2", tmp_path / "c.img",
                        tmp_path / "console.log")
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "labctl-l1-st1"
    owner = root.find(f"metadata/{{{sn.METADATA_NS}}}owner")
    assert owner is not None
    assert owner.findtext(f"{{{sn.METADATA_NS}}}lab") == "l1"
    assert owner.findtext(f"{{{sn.METADATA_NS}}}lab_dir") == str(tmp_path.resolve())
    cmdline = root.findtext("os/cmdline") or ""
    assert "console=ttyS0" in cmdline and "cryptomgr.notests" in cmdline
    assert "acpi=off" not in cmdline
    cpu = root.find("cpu")
    assert cpu is not None and cpu.get("mode") == "maximum"
    serials = [d.findtext("serial") for d in root.iter("disk")]
    assert serials == ["labctl-config", "lc-ds1"]
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "bridge"
    target = nic.find("target")
    assert target is not None and target.get("dev") == "lctap0"
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert any(a and a.startswith("nvme,drive=lcroot") for a in args)


# --- end to end ---------------------------------------------------------------------------

H1_IQN = "iqn.2025-01.test.labctl:host1"
H2_IQN = "iqn.2025-01.test.labctl:host2"
TARGET_IQN = "iqn.2025-01.test.labctl:storage1"
UNIT_SERIAL = "123456789abcdef123456789abcdef12"  # no '0' digits: iscsi-inq prints the NAA raw
DISK_SERIAL = "lc-ds1"


def _missing_e2e_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root (bridges, namespaces, libvirt qemu:///system)"
    for tool in ("qemu-system-x86_64", "qemu-img", "libvirtd", "virtlogd", "virsh", "mmdebstrap",
                 "mkfs.ext4", "ip", "nsenter", "iscsi-inq", "iscsi-ls", "iscsi-readcapacity16"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run scripts/setup.sh)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed"
    return None


@dataclass
class StorageLab:
    node: object  # storagenode.StorageNodeHandle
    secret: bytes
    ns_named: str
    ns_other: str
    lab_dir: Path
    node_ip: str  # the storage node's address on the bridge


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def storage_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageLab]:
    why = _missing_e2e_requirements()
    if why:
        pytest.skip(why)
    from labctl.storage import node as storagenode
    from labctl.storage.image import ensure_storage_image

    tag = secrets.token_hex(2)
    subnet = free_subnet()
    node_ip = str(subnet[2])
    bridge, tap = f"lctestb{tag}", f"lctestt{tag}"
    nss = [f"lctest-{tag}-h1", f"lctest-{tag}-h2"]
    veths = [f"lctestv{tag}a", f"lctestv{tag}b"]
    lab = f"lctest{tag}"
    lab_dir = tmp_path_factory.mktemp("storage-lab")
    secret = os.urandom(32)
    try:
        image = asyncio.run(ensure_storage_image())
        asyncio.run(storagenode.ensure_libvirtd())
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet[1]}/{subnet.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, (ns, veth) in enumerate(zip(nss, veths, strict=True)):
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{subnet[10 + i]}/{subnet.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        spec = storagenode.StorageNodeSpec(
            lab=lab, name="storage1", address_cidr=f"{node_ip}/{subnet.prefixlen}",
            bridge=bridge, tap=tap, mac="52:54:00:4c:77:02", lab_dir=lab_dir, secret=secret,
            target_iqn=TARGET_IQN,
            data_disks=[storagenode.DataDisk(DISK_SERIAL, lab_dir / "ds1.img", 64 << 20)])
        handle = asyncio.run(storagenode.start(spec, image))
        ready = [ln for ln in handle.console_log.read_text(errors="replace").splitlines()
                 if "labctl-storage: ready" in ln]
        print(f"storage node answered {handle.boot_s:.2f} s after domain start; console: {ready}",
              file=sys.stderr)
        yield StorageLab(handle, secret, nss[0], nss[1], lab_dir, node_ip)
    finally:
        try:
            removed = asyncio.run(storagenode.destroy_owned(lab, lab_dir))
            print(f"removed domains {removed}", file=sys.stderr)
            for dom in removed:  # libvirt keeps a domain's QEMU log: the lab's file
                (LIBVIRT_QEMU_LOGS / f"{dom}.log").unlink(missing_ok=True)
        finally:
            for ns in nss:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            for link in (*veths, bridge):
                subprocess.run(["ip", "link", "del", link], capture_output=True)
            shutil.rmtree(lab_dir, ignore_errors=True)
    # checked from outside labctl, once everything else is cleaned up
    doms = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                          capture_output=True, text=True, check=True).stdout
    assert [d for d in doms.split() if d.startswith(f"labctl-{lab}-")] == []
    assert list(LIBVIRT_QEMU_LOGS.glob(f"labctl-{lab}-*.log")) == []


async def _ensure_lun(lab: StorageLab, initiators: list[str]) -> dict[str, object]:
    from labctl.storage.node import StorageNodeHandle

    node = lab.node
    assert isinstance(node, StorageNodeHandle)
    async with await node.client() as c:
        lun = await c.call("ensure_lun", name="ds1", disk_serial=DISK_SERIAL,
                           unit_serial=UNIT_SERIAL, initiators=initiators)
        assert isinstance(lun, dict)
        return lun


def _chap(lab: StorageLab, initiator: str, mutual: bool = True) -> dict[str, str]:
    """libiscsi's environment with ``initiator``'s CHAP credentials in this lab. ``iscsi-ls``
    gets no target secret (``mutual=False``): it would demand one of the discovery session,
    which LIO does not authenticate per initiator."""
    env = chap_for(lab.secret, initiator, TARGET_IQN).libiscsi_env()
    return env if mutual else {k: v for k, v in env.items() if "_TARGET_" not in k}


def _naa_seen(inq_stdout: bytes) -> str:
    """The NAA designator in ``iscsi-inq -e 1 -c 131`` output (it prints the 16 bytes raw)."""
    m = re.search(rb"Designator Type:\(3\) NAA\nDesignator:\[(.{16})\]", inq_stdout, re.S)
    assert m, inq_stdout
    return m.group(1).hex()


@pytest.mark.e2e
def test_lun_naa_size_and_acls(storage_lab: StorageLab) -> None:
    lun = asyncio.run(_ensure_lun(storage_lab, [H1_IQN]))
    assert lun["naa"] == "naa." + naa_from_unit_serial(UNIT_SERIAL)
    assert lun["size_bytes"] == 64 << 20
    assert lun["initiators"] == [H1_IQN]
    url = f"iscsi://{storage_lab.node_ip}/{TARGET_IQN}/{lun['lun']}"

    async def probe() -> None:
        inq = await asyncio.create_subprocess_exec(
            "nsenter", f"--net=/run/netns/{storage_lab.ns_named}", "--",
            "iscsi-inq", "-e", "1", "-c", "131", "-i", H1_IQN, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **_chap(storage_lab, H1_IQN)})
        out, err = await inq.communicate()
        assert inq.returncode == 0, err
        assert "naa." + _naa_seen(out) == lun["naa"]

        cap = await run(["iscsi-readcapacity16", "-s", "-i", H1_IQN, url],
                        netns=storage_lab.ns_named, env=_chap(storage_lab, H1_IQN))
        assert int(cap.stdout.strip()) == 64 << 20
        ls = await run(["iscsi-ls", "-s", "-i", H1_IQN, f"iscsi://{storage_lab.node_ip}"],
                       netns=storage_lab.ns_named, env=_chap(storage_lab, H1_IQN, mutual=False))
        assert f"Target:{TARGET_IQN}" in ls.stdout and f"Lun:{lun['lun']}" in ls.stdout

        refused = await run(["iscsi-ls", "-s", "-i", H2_IQN, f"iscsi://{storage_lab.node_ip}"],
                            netns=storage_lab.ns_other, check=False,
                            env=_chap(storage_lab, H2_IQN, mutual=False))
        assert refused.returncode != 0
        assert "Authorization failure" in refused.stdout + refused.stderr
        # the same initiator name from the other namespace is refused too, and a host
        # named for nothing cannot read the LUN
        refused = await run(["iscsi-readcapacity16", "-s", "-i", H2_IQN, url],
                            netns=storage_lab.ns_other, check=False,
                            env=_chap(storage_lab, H2_IQN))
        assert refused.returncode != 0
        assert any(w in refused.stdout + refused.stderr for w in (NO_ACL, NO_LUN)), refused

    asyncio.run(probe())


@pytest.mark.e2e
def test_a_claimed_iqn_without_its_secret_gets_nothing(storage_lab: StorageLab) -> None:
    """From the other host's namespace, claim host1's IQN: without host1's CHAP secret (none,
    a wrong one, host2's own) no login and no LUN; with it, the LUN reads, so the refusals
    are the secret's doing. A target that cannot prove the mutual secret is refused by the
    initiator."""
    lun = asyncio.run(_ensure_lun(storage_lab, [H1_IQN, H2_IQN]))
    url = f"iscsi://{storage_lab.node_ip}/{TARGET_IQN}/{lun['lun']}"
    good = chap_for(storage_lab.secret, H1_IQN, TARGET_IQN)
    other = chap_for(storage_lab.secret, H2_IQN, TARGET_IQN)
    assert len({good.password, good.target_password, other.password,
                other.target_password}) == 4
    no_target_check = _chap(storage_lab, H1_IQN, mutual=False)
    cases = {
        "none": {},
        "wrong password": {**no_target_check, "LIBISCSI_CHAP_PASSWORD": "0" * 32},
        "host2's secret": {**no_target_check, "LIBISCSI_CHAP_PASSWORD": other.password},
        "bad target secret": {**good.libiscsi_env(),
                              "LIBISCSI_CHAP_TARGET_PASSWORD": other.target_password},
    }

    async def probe() -> None:
        for what, env in cases.items():
            cap = await run(["iscsi-readcapacity16", "-s", "-i", H1_IQN, url],
                            netns=storage_lab.ns_other, check=False, env=env or None)
            assert cap.returncode != 0, (what, cap)
            assert not cap.stdout.strip().isdigit(), (what, cap)
            if "TARGET" not in str(env):
                ls = await run(["iscsi-ls", "-s", "-i", H1_IQN,
                                f"iscsi://{storage_lab.node_ip}"],
                               netns=storage_lab.ns_other, check=False, env=env or None)
                assert f"Lun:{lun['lun']}" not in ls.stdout, (what, ls)
        ok = await run(["iscsi-readcapacity16", "-s", "-i", H1_IQN, url],
                       netns=storage_lab.ns_other, env=good.libiscsi_env())
        assert int(ok.stdout.strip()) >= 64 << 20
        # the agent's own probe: mutual CHAP in process, and refused without the secret
        probed = await asyncio.to_thread(iscsi.probe_unit, f"{storage_lab.node_ip}:3260",
                                         TARGET_IQN, int(str(lun["lun"])), H1_IQN, good)
        assert probed.naa == lun["naa"]
        luns, _ = await asyncio.to_thread(iscsi.report_luns, f"{storage_lab.node_ip}:3260",
                                          TARGET_IQN, H1_IQN, good)
        assert [(x.lun, x.size_bytes) for x in luns] == [(lun["lun"], lun["size_bytes"])]
        for bad in (dataclasses.replace(good, password=other.password),
                    dataclasses.replace(good, target_password=other.target_password)):
            with pytest.raises(LabError, match=r"login to .* failed"):
                await asyncio.to_thread(iscsi.probe_unit, f"{storage_lab.node_ip}:3260",
                                        TARGET_IQN, int(str(lun["lun"])), H1_IQN, bad)
            with pytest.raises(LabError, match=r"login to .* failed"):
                await asyncio.to_thread(iscsi.report_luns, f"{storage_lab.node_ip}:3260",
                                        TARGET_IQN, H1_IQN, bad)

    asyncio.run(probe())


@pytest.mark.e2e
def test_initiators_follow_ensure_lun(storage_lab: StorageLab) -> None:
    url = f"iscsi://{storage_lab.node_ip}/{TARGET_IQN}/0"
    lun = asyncio.run(_ensure_lun(storage_lab, [H2_IQN]))
    assert lun["initiators"] == [H2_IQN]

    async def probe() -> None:
        gone = await run(["iscsi-readcapacity16", "-s", "-i", H1_IQN, url],
                         netns=storage_lab.ns_named, check=False, env=_chap(storage_lab, H1_IQN))
        assert gone.returncode != 0
        assert any(w in gone.stdout + gone.stderr for w in (NO_ACL, NO_LUN)), gone
        ok = await run(["iscsi-readcapacity16", "-s", "-i", H2_IQN, url],
                       netns=storage_lab.ns_other, env=_chap(storage_lab, H2_IQN))
        assert int(ok.stdout.strip()) >= 64 << 20

    asyncio.run(probe())
    lun = asyncio.run(_ensure_lun(storage_lab, [H1_IQN]))  # back to the first host
    assert lun["initiators"] == [H1_IQN]


@pytest.mark.e2e
def test_resize_shows_through_lio(storage_lab: StorageLab) -> None:
    from labctl.storage import node as storagenode
    from labctl.storage.node import StorageNodeHandle

    node = storage_lab.node
    assert isinstance(node, StorageNodeHandle)
    lun = asyncio.run(_ensure_lun(storage_lab, [H1_IQN]))
    new_size = 96 << 20

    async def grow() -> dict[str, object]:
        await storagenode.resize_data_disk(node.lab, node.name, DISK_SERIAL, new_size)
        async with await node.client() as c:
            for _ in range(50):
                cap = await c.call("refresh_capacity", name="ds1")
                if cap["size_bytes"] == new_size:
                    break
                await asyncio.sleep(0.1)
            assert isinstance(cap, dict)
            return cap

    assert asyncio.run(grow())["size_bytes"] == new_size
    url = f"iscsi://{storage_lab.node_ip}/{TARGET_IQN}/{lun['lun']}"
    seen = asyncio.run(run(["iscsi-readcapacity16", "-s", "-i", H1_IQN, url],
                           netns=storage_lab.ns_named, env=_chap(storage_lab, H1_IQN)))
    assert int(seen.stdout.strip()) == new_size
    assert (storage_lab.lab_dir / "ds1.img").stat().st_size == new_size


@pytest.mark.e2e
def test_wrong_secret_is_refused(storage_lab: StorageLab) -> None:
    from labctl.core.rpc import RpcClient
    from labctl.storage.node import StorageNodeHandle

    node = storage_lab.node
    assert isinstance(node, StorageNodeHandle)
    with pytest.raises(AuthenticationFailed):
        asyncio.run(RpcClient.connect(node.address, node.agent_port, b"wrong" * 8, timeout=5))
