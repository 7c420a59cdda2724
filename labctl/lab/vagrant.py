"""A lab of Vagrant machines (vagrant-libvirt): the local box, and ``labctl vagrant up|down``.

**The box** (``images/box/``): no box can be downloaded on a machine without internet, so
labctl builds one from Debian's packages: ``mmdebstrap`` (minbase and the recipe's
``packages``) into a directory, the root made a Vagrant machine (user ``vagrant`` with
passwordless sudo and Vagrant's insecure key, which ``vagrant up`` replaces; ifupdown for
the networks Vagrant configures), ``mkfs.ext4 -d`` (no loop device, nothing mounted), a
compressed qcow2, and the kernel and initrd beside it: the box's own Vagrantfile boots them
directly (``/dev/vda`` is the bare file system, no boot loader). Built once per recipe
hash into the image cache, added to Vagrant under a name carrying that hash.

**Host keys, out of band**: the box has no SSH host keys; each machine makes its own at
first boot and prints the public key on its serial console (``LABCTL-HOSTKEY``), which
libvirt writes to a file of the lab's. ``up`` reads each machine's key from there and
writes it where a topology's ``ssh.host_key`` can name it: the controller never trusts a
key first seen over the network.

**Where things go**: Vagrant's own directory (``VAGRANT_DOTFILE_PATH``) and the keys are
under ``$LABCTL_HOME/vagrant/<lab>/``, never in the source tree, so two labs (or two
checkouts) do not share them. QEMU opens the kernel and the console logs as libvirt's
user, who cannot enter root's home: the boxes (``VAGRANT_HOME``) and the consoles are
under ``/var/lib/labctl/``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import yaml

from labctl.core.errors import ImageBuildError, LabStateError, MissingDependency, ProvisionError
from labctl.core.paths import cache_dir, repo_root
from labctl.core.proc import run, which
from labctl.core.secret import write_private
from labctl.core.wire import Message
from labctl.drivers.debian import digest
from labctl.drivers.netlink import overlapping_routes
from labctl.drivers.ssh import SshMachine
from labctl.lab.bringup import probe_accel
from labctl.lab.topology import (
    Topology,
    machine_items,
    vagrant_dir,
    vagrant_host_key,
    vagrant_key,
)
from labctl.storage import domains
from labctl.storage.image import debian_suite, publish_build, recipe_packages

#: bumped when the box's build changes in a way its recipe files do not show
BOX_VERSION = "2"
#: units the box's packages enable that no machine of a lab runs from boot
BOX_IDLE_UNITS = ("nfs-server.service", "nfs-blkmap.service", "rpcbind.service",
                  "rpcbind.socket")
HOSTKEY_MARK = "LABCTL-HOSTKEY"
#: the box's disk as the machine sees it (a sparse file, a compressed qcow2 in the box)
BOX_DISK_GIB = 10
#: Debian's vagrant package ships Vagrant's insecure key here
VAGRANT_KEYS = Path("/usr/share/rubygems-integration/all/gems")
#: Vagrant's home for labctl's labs (boxes): readable by QEMU's user, unlike root's home
VAGRANT_HOME = Path("/var/lib/labctl/vagrant.d")
#: the management networks labctl gives its Vagrant labs (a free /24 of these)
MGMT_RANGE = ipaddress.IPv4Network("10.241.0.0/16")

Progress = Callable[[str], None]


def recipe_dir() -> Path:
    return repo_root() / "images" / "box"


def box_hash(recipe: Path | None = None) -> str:
    recipe = recipe or recipe_dir()
    parts: list[str | bytes] = [BOX_VERSION, debian_suite(), str(BOX_DISK_GIB)]
    for f in sorted(p for p in recipe.rglob("*") if p.is_file()):
        parts += [str(f.relative_to(recipe)), f.read_bytes()]
    return digest(*parts)


@dataclass(frozen=True)
class Box:
    path: Path  # the .box file
    name: str  # as Vagrant knows it
    recipe_hash: str


#: suites whose backports the box takes the ``backports`` list from
BACKPORTS = ("bookworm",)


def vagrant_insecure_key() -> Path:
    """Vagrant's insecure public key, as Debian's vagrant package ships it."""
    found = sorted(VAGRANT_KEYS.glob("vagrant-*/keys/vagrant.pub"))
    if not found:
        raise MissingDependency("Vagrant's insecure key is not installed (Debian's vagrant "
                                "package ships it): run scripts/setup.sh", program="vagrant")
    return found[-1]


async def ensure_box(cache: Path | None = None, progress: Progress | None = None) -> Box:
    """The local box, built once per recipe hash into ``<cache>/box/<hash>/labctl.box``."""
    say = progress or (lambda _m: None)
    recipe = recipe_dir()
    h = box_hash(recipe)
    suite = debian_suite()
    dest = (cache or cache_dir()) / "box" / h
    box = Box(dest / "labctl.box", f"labctl-{suite}-{h}", h)
    if (dest / "done").exists():
        return box
    for tool, why in (("mmdebstrap", "mmdebstrap"), ("mkfs.ext4", "e2fsprogs"),
                      ("qemu-img", "qemu-utils"), ("tar", "tar")):
        which(tool, f"{why}, needed to build the Vagrant box")
    key = vagrant_insecure_key()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{h}."))
    try:
        t0 = time.monotonic()
        root, out = tmp / "root", tmp / "out"
        out.mkdir()
        mirrors = [f"deb http://deb.debian.org/debian {suite} main"]
        packages = recipe_packages(recipe)
        backports = recipe_packages(recipe, "backports")
        hooks = []
        if suite in BACKPORTS:
            # these from backports, with what they need from there (apt's -t), by a hook
            # script of the recipe's; the packages come from a file, never a command line
            mirrors.append(f"deb http://deb.debian.org/debian {suite}-backports main")
            hooks = [f"--customize-hook={recipe / 'backports-hook'}"]
            later = f", then from {suite}-backports: {', '.join(backports)}"
        else:
            packages, later = packages + backports, ""
        say(f"mmdebstrap {suite} (minbase) with {', '.join(packages)}{later} for the box")
        await run(["mmdebstrap", "--mode=root", "--variant=minbase", "--quiet",
                   "--include=" + ",".join(packages), "--aptopt=Acquire::Languages \"none\"",
                   "--dpkgopt=path-exclude=/usr/share/man/*",
                   "--dpkgopt=path-exclude=/usr/share/doc/*",
                   "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                   "--dpkgopt=path-exclude=/usr/share/locale/*", *hooks,
                   suite, str(root), *mirrors],
                  timeout=1800, what="mmdebstrap (Vagrant box)",
                  env={"LABCTL_BOX_BACKPORTS": str(recipe / "backports"),
                       "LABCTL_BOX_SUITE": suite})
        await _customize(root, out, recipe, key)
        raw = out / "root.raw"
        with open(raw, "wb") as f:
            f.truncate(BOX_DISK_GIB << 30)
        await run(["mkfs.ext4", "-q", "-F", "-L", "labctl-root", "-E", "root_owner=0:0",
                   "-d", str(root), str(raw)], timeout=600, what="mkfs.ext4 (Vagrant box)")
        shutil.rmtree(root)
        await run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(raw),
                   str(out / "box.img")], timeout=1200, what="qemu-img convert (Vagrant box)")
        raw.unlink()
        (out / "metadata.json").write_text(json.dumps(
            {"provider": "libvirt", "format": "qcow2", "virtual_size": BOX_DISK_GIB}) + "\n")
        shutil.copyfile(recipe / "Vagrantfile.box", out / "Vagrantfile")
        await run(["tar", "-C", str(out), "-czf", str(tmp / "labctl.box"), "metadata.json",
                   "Vagrantfile", "box.img", "vmlinuz", "initrd.img"], timeout=600,
                  what="tar (Vagrant box)")
        shutil.rmtree(out)
        took = time.monotonic() - t0
        publish_build(tmp, dest, f"{h} built in {took:.1f} s\n")
        say(f"Vagrant box {box.name} ready in {took:.1f} s")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception) or isinstance(exc, ImageBuildError):
            raise
        raise ImageBuildError(f"building the Vagrant box failed: {exc}", recipe_hash=h) from exc
    return box


async def _customize(root: Path, out: Path, recipe: Path, key: Path) -> None:
    """The bootstrapped root made a Vagrant machine; its kernel and initrd into ``out``."""
    await run(["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash",
               "--user-group", "vagrant"], what="useradd vagrant (Vagrant box)")
    uid = gid = -1
    for line in (root / "etc/passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == "vagrant":
            uid, gid = int(f[2]), int(f[3])
    sudoers = root / "etc/sudoers.d/vagrant"
    sudoers.write_text("vagrant ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    ssh = root / "home/vagrant/.ssh"
    ssh.mkdir(mode=0o700)
    shutil.copyfile(key, ssh / "authorized_keys")
    (ssh / "authorized_keys").chmod(0o600)
    for p in (ssh, ssh / "authorized_keys"):
        os.chown(p, uid, gid)
    (root / "etc/fstab").write_text("/dev/vda / ext4 errors=remount-ro 0 1\n")
    shutil.copyfile(recipe / "interfaces", root / "etc/network/interfaces")
    (root / "etc/hostname").write_text("labctl-box\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tlabctl-box\n"
                                    "::1\tlocalhost ip6-localhost ip6-loopback\n")
    # no host keys in the box: each machine makes its own and prints it on its console
    for old in (root / "etc/ssh").glob("ssh_host_*"):
        old.unlink()
    shutil.copyfile(recipe / "labctl-hostkey.service",
                    root / "etc/systemd/system/labctl-hostkey.service")
    await run(["chroot", str(root), "systemctl", "enable", "labctl-hostkey.service"],
              what="systemctl enable (Vagrant box)")
    # the box carries the NFS server for storage machines, whose agent runs its daemons
    # itself: no machine starts Debian's at boot (a host would serve NFS and rpcbind)
    await run(["chroot", str(root), "systemctl", "disable", *BOX_IDLE_UNITS],
              what="systemctl disable (Vagrant box)")
    (root / "etc/ssh/sshd_config.d/labctl.conf").write_text(
        "HostKey /etc/ssh/ssh_host_ed25519_key\nUseDNS no\n")
    (root / "etc/machine-id").write_text("")  # each machine makes its own at first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for link, name in (("vmlinuz", "vmlinuz"), ("initrd.img", "initrd.img")):
        target = os.readlink(root / link)
        shutil.copyfile(root / target.lstrip("/"), out / name)
    for junk in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for child in (root / junk).glob("*"):
            if child.is_file():
                child.unlink()


# ------------------------------------------------------------------ the machines


def workdir(lab: str) -> Path:
    return vagrant_dir(lab)


def console_dir(lab: str) -> Path:
    """Where the lab's machines' serial consoles are logged: QEMU opens these files as
    libvirt's user, who cannot enter root's home (where the lab's directory usually is),
    so they go in a machine-wide directory, under a name of this lab's directory."""
    return VAGRANT_HOME.parent / "consoles" / f"{lab}-{digest(str(workdir(lab)))[:10]}"


@dataclass(frozen=True)
class VagrantMachine(Message):
    name: str
    #: storage or hosts (the playbooks' group)
    group: str
    address: str
    #: the public host key it printed on its console (pinned)
    host_key: str
    #: where that key is written, for a topology's ssh.host_key
    host_key_file: str
    #: the lab's key, which ``up`` authorized for ``user`` (root) through Vagrant's user
    key: str
    user: str = "root"


@dataclass(frozen=True)
class VagrantUp(Message):
    lab: str
    box: str
    provisioned: bool
    machines: list[VagrantMachine]
    #: Vagrant's directory for the lab (VAGRANT_DOTFILE_PATH)
    dotfile: str
    #: the topology with its hosts and storage nodes as these machines (``ssh:`` blocks,
    #: host keys pinned), for ``labctl up``
    topology: str | None = None


@dataclass(frozen=True)
class VagrantDown(Message):
    lab: str
    #: the machines destroyed, one line each (``machine host1 (domain UUID)``), then the
    #: QEMU logs libvirt kept of their domains (``file PATH``)
    removed: list[str]


def _mgmt_network(lab: str) -> str:
    """The lab's management network: the one recorded, else a free /24."""
    saved = workdir(lab) / "mgmt-network"
    if saved.exists():
        return saved.read_text().strip()
    for net in MGMT_RANGE.subnets(new_prefix=24):
        if not overlapping_routes(net):
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(f"{net}\n")
            return str(net)
    raise ProvisionError(f"no free /24 in {MGMT_RANGE} for the lab's management network")


def environment(topo: Topology, topo_path: Path, box: str | None = None,
                accel: str | None = None) -> dict[str, str]:
    """What the top-level Vagrantfile reads, and Vagrant's own directories for the lab."""
    w = workdir(topo.name)
    env = {"VAGRANT_CWD": str(repo_root()), "VAGRANT_DOTFILE_PATH": str(w / "dot"),
           # the boxes (their kernels are opened by QEMU as libvirt's user, which cannot
           # enter root's home): a machine-wide directory, unless the user chose one
           "VAGRANT_HOME": os.environ.get("VAGRANT_HOME") or str(VAGRANT_HOME),
           "VAGRANT_DEFAULT_PROVIDER": "libvirt", "LABCTL_TOPOLOGY": str(topo_path.resolve()),
           "LABCTL_VAGRANT_CONSOLE_DIR": str(console_dir(topo.name)),
           "LABCTL_VAGRANT_MGMT": _mgmt_network(topo.name)}
    if box is not None:
        env["LABCTL_VAGRANT_BOX"] = box
    if accel is not None:
        env["LABCTL_VAGRANT_ACCEL"] = accel
    return env


def machines_of(topo: Topology) -> list[tuple[str, str, str]]:
    """(name, group, address) of each machine the Vagrantfile defines for ``topo``."""
    return ([(n.name, "storage", str(n.address)) for n in topo.storage_nodes]
            + [(h.name, "hosts", str(h.address)) for h in topo.hosts])


async def _vagrant(env: dict[str, str], *args: str, timeout: float = 3600.0,
                   what: str = "") -> str:
    res = await run(["vagrant", *args], env=env, cwd=repo_root(), timeout=timeout,
                    check=False, what=what or f"vagrant {' '.join(args)}")
    if not res.ok:
        tail = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        raise ProvisionError(f"vagrant {' '.join(args)} failed: "
                             f"{tail[-1] if tail else 'exit ' + str(res.returncode)}",
                             stdout=res.stdout[-3000:], stderr=res.stderr[-3000:])
    return res.stdout


async def _box_added(env: dict[str, str], box: Box) -> None:
    listed = await _vagrant(env, "box", "list", "--machine-readable", timeout=120)
    names = {ln.split(",")[3] for ln in listed.splitlines()
             if len(ln.split(",")) > 3 and ln.split(",")[2] == "box-name"}
    if box.name not in names:
        await _vagrant(env, "box", "add", "--name", box.name, str(box.path), timeout=600)


def _console_key(path: Path) -> str | None:
    """The last host key a machine printed on its console (the log is rewritten at each
    start of the domain)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    keys = [ln.split(HOSTKEY_MARK, 1)[1].strip() for ln in text.splitlines()
            if HOSTKEY_MARK in ln]
    return keys[-1] if keys else None


def _missing_drivers() -> dict[str, str]:
    """The libvirtd drivers vagrant-libvirt needs that the daemon runs without, and why."""
    lv = domains.libvirt_module()
    conn = domains.open_conn()
    missing = {}
    try:
        for driver, probe in (("network", conn.listNetworks), ("storage", conn.listStoragePools)):
            try:
                probe()
            except lv.libvirtError as exc:
                missing[driver] = str(exc)
    finally:
        conn.close()
    return missing


def _domain_names(uuids: dict[str, str]) -> dict[str, str]:
    """The libvirt domain name of each machine among ``uuids`` (name: domain UUID) whose
    domain libvirt has."""
    lv = domains.libvirt_module()
    conn = domains.open_conn()
    names = {}
    try:
        for name, uuid in uuids.items():
            try:
                names[name] = str(conn.lookupByUUIDString(uuid).name())
            except lv.libvirtError:
                continue
    finally:
        conn.close()
    return names


async def _libvirt_ready() -> None:
    """libvirtd answering, with the network and storage drivers vagrant-libvirt needs."""
    from labctl.storage import node as storagenode  # noqa: PLC0415 (libvirt: only here)

    await storagenode.ensure_libvirtd()
    for driver, why in (await domains.in_thread(_missing_drivers)).items():
        raise MissingDependency(
            f"libvirtd runs without its {driver} driver, which vagrant-libvirt needs: "
            f"install libvirt-daemon-driver-{driver} (scripts/setup.sh) and start libvirtd "
            "again with no lab up", error=why)


async def up(topo: Topology, topo_path: Path, provision: bool = True,
             progress: Progress | None = None) -> VagrantUp:
    """The topology's machines as Vagrant VMs from the local box, optionally provisioned
    by playbooks/site.yml; each one's host key read from its console."""
    say = progress or (lambda _m: None)
    which("vagrant", "Debian's vagrant and vagrant-libvirt packages (scripts/setup.sh)")
    await _libvirt_ready()
    box = await ensure_box(progress=say)
    # the machines run under KVM only where a guest really runs under it here
    accel = await probe_accel()
    VAGRANT_HOME.mkdir(parents=True, exist_ok=True, mode=0o755)
    env = environment(topo, topo_path, box.name, accel)
    await _box_added(env, box)
    w = workdir(topo.name)
    lab_key = _lab_key(topo.name)
    consoles = console_dir(topo.name)
    for d in (consoles.parent.parent, consoles.parent, consoles):
        d.mkdir(exist_ok=True, mode=0o755)
    t0 = time.monotonic()
    say(f"vagrant up of {len(machines_of(topo))} machines (box {box.name})")
    await _vagrant(env, "up", "--no-provision")
    say(f"machines up in {time.monotonic() - t0:.1f} s")
    if provision:
        t1 = time.monotonic()
        await _vagrant(env, "provision")
        say(f"provisioned by playbooks/site.yml in {time.monotonic() - t1:.1f} s")
    found = []
    for name, group, address in machines_of(topo):
        console = consoles / f"{name}.console"
        deadline = time.monotonic() + 60
        key = _console_key(console)
        while key is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            key = _console_key(console)
        if key is None:
            raise ProvisionError(f"machine {name} printed no host key on its console "
                                 f"({console})", machine=name)
        pub = vagrant_host_key(topo.name, name)
        pub.parent.mkdir(exist_ok=True)
        pub.write_text(key + "\n")
        found.append(VagrantMachine(
            name=name, group=group, address=address, host_key=key, host_key_file=str(pub),
            key=str(lab_key)))
        await _authorize(name, address, w / "dot" / "machines" / name / "libvirt" /
                         "private_key", key, lab_key)
    made = w / f"{topo.name}.yaml"
    made.write_text(_ssh_topology(topo_path, found))
    return VagrantUp(lab=topo.name, box=box.name, provisioned=provision, machines=found,
                     dotfile=str(w / "dot"), topology=str(made))


def _lab_key(lab: str) -> Path:
    """The lab's SSH key for root on its machines (0600), made once."""
    path = vagrant_key(lab)
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"labctl {lab}")
        write_private(path, key.export_private_key())
        path.with_suffix(".pub").write_bytes(key.export_public_key())
    return path


async def _authorize(name: str, address: str, vagrant_user_key: Path, host_key: str,
                     lab_key: Path) -> None:
    """The lab's key authorized for root on the machine, through Vagrant's user and sudo
    (the session pinned to the key the machine's console printed)."""
    pub = lab_key.with_suffix(".pub").read_text()
    async with SshMachine(name, address, vagrant_user_key, host_key, user="vagrant",
                          pinned_by="its console printed") as m:
        await m.run(["sudo", "-n", "install", "-d", "-m", "0700", "/root/.ssh"])
        await m.run(["sudo", "-n", "tee", "/root/.ssh/authorized_keys"], stdin=pub)
        await m.run(["sudo", "-n", "chmod", "0600", "/root/.ssh/authorized_keys"])


def _ssh_topology(source: Path, machines: list[VagrantMachine]) -> str:
    """The topology file with each host and storage node given as its machine (a copy, the
    original kept)."""
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    by_name = {m.name: m for m in machines}
    for h in machine_items(data):
        m = by_name[h["name"]]
        h["address"] = m.address
        h["ssh"] = {"key": m.key, "host_key": m.host_key_file, "user": m.user}
    return str(yaml.safe_dump(data, sort_keys=False))


async def down(topo: Topology, topo_path: Path, progress: Progress | None = None
               ) -> VagrantDown:
    """``vagrant destroy`` of the lab's machines, then a check that their domains are gone
    (by the UUIDs Vagrant recorded); the lab's Vagrant directories removed."""
    say = progress or (lambda _m: None)
    w = workdir(topo.name)
    if not (w / "dot").exists():
        raise LabStateError(f"no Vagrant machines of lab {topo.name} here ({w / 'dot'})",
                            lab=topo.name)
    env = environment(topo, topo_path)
    ids = {}
    for name, _group, _addr in machines_of(topo):
        idf = w / "dot" / "machines" / name / "libvirt" / "id"
        if idf.exists():
            ids[name] = idf.read_text().strip()
    # the domains' names by the UUIDs Vagrant recorded: libvirt keeps each one's QEMU log
    # (``/var/log/libvirt/qemu/NAME.log``) after the domain is gone
    named = await domains.in_thread(_domain_names, ids)
    await _vagrant(env, "destroy", "-f", timeout=900)
    removed = [f"machine {n} (domain {u})" for n, u in ids.items()]
    left = [f"domain of {n} ({ids[n]})" for n in await domains.in_thread(_domain_names, ids)]
    if left:
        raise ProvisionError("vagrant destroy left " + ", ".join(left), left=left)
    for dom in named.values():
        log = domains.LIBVIRT_QEMU_LOGS / f"{dom}.log"
        if log.exists():
            log.unlink()
            removed.append(f"file {log}")
    shutil.rmtree(w)
    shutil.rmtree(console_dir(topo.name), ignore_errors=True)
    say(f"lab {topo.name}'s machines destroyed; {w} removed")
    return VagrantDown(lab=topo.name, removed=removed)
