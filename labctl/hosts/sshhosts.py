"""Hosts that are machines reached over SSH (hardware, a Vagrant lab): the second
:class:`~labctl.hosts.provider.HostProvider`.

The machine exists before the lab and outlives it: labctl makes nothing on it but the
agent's state directory (named after the lab's tag, so two labs never share one) and,
with ``agent: systemd``, a drop-in for the playbooks' unit. Over one SSH session
with the machine's host key pinned (from the topology: never trust on first use) it
delivers the lab secret (SFTP, 0600, never on a command line), starts the host agent and
waits for it to answer the authenticated RPC every feature then uses, unchanged.

* ``agent: process`` (default): ``python -m labctl.agents.remote start`` launches the agent
  in a session of its own, listening on the host's site address; teardown has the same
  helper stop it (and any QEMU it left) by the PIDs in its state directory, each only while
  its command line names that directory, then removes the directory.
* ``agent: systemd``: the playbooks' unit (``labctl-host-agent.service``, on a storage
  machine ``labctl-storage-agent.service``) runs the agent on the lab's files: the secret
  (and the guest, or the node's config) go into the state directory as for a process
  agent, a drop-in replaces the unit's command with the agent on that directory, and the
  unit is restarted; teardown stops it and removes the drop-in.

Every step is journalled (kind ``ssh-host``) before it is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import io
import json
import re
import stat
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncssh

import labctl
from labctl.core import names
from labctl.core.errors import AgentError, LabError, ProvisionError
from labctl.core.rpc import RpcClient
from labctl.core.wire import Method
from labctl.drivers.ssh import SshError, SshMachine
from labctl.guest.image import GIVEN_IMAGE_ENV, ensure_guest_image
from labctl.hosts import protocol as hp
from labctl.hosts.provider import HostPlan, ProvisionedHost
from labctl.state.inventory import Inventory
from labctl.storage import protocol as sp

AGENT_MODES = ("process", "systemd")
#: a process agent runs the controller's own code, handed over at provision (``src/`` in
#: its state directory) with the machine's Python 3
DEFAULT_PYTHON = "python3"
#: where the playbooks' unit finds labctl (``agent: systemd``)
VENV_PYTHON = "/opt/labctl/venv/bin/python"
DEFAULT_UNIT = "labctl-host-agent.service"
DEFAULT_STORAGE_UNIT = "labctl-storage-agent.service"
DEFAULT_SECRET_PATH = "/etc/labctl/secret"
STATE_ROOT = "/var/lib/labctl/labs"


@dataclass(frozen=True)
class SshAccess:
    """How the controller reaches one machine: its SSH address, user, client key (a file on
    the controller, 0600) and pinned host key; how its agent runs."""

    address: str
    user: str = "root"
    port: int = 22
    key: str = ""
    host_key: str = ""
    agent: str = "process"
    python: str = DEFAULT_PYTHON
    unit: str = DEFAULT_UNIT
    #: read no more (a unit's agent reads the lab's directory now); kept so that the
    #: journal entries of labs brought up before still load
    secret_path: str = DEFAULT_SECRET_PATH
    #: the machine ``labctl vagrant up`` made for this lab (the topology said ``ssh:
    #: vagrant``): its key and host key are that command's; "" for a machine described
    vagrant: str = ""
    #: the port this lab's agent listens on there; 0: the role's own (7600 for a host,
    #: 7700 for a storage node). Two labs on one machine need two.
    agent_port: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SshAccess:
        return cls(**json.loads(text))

    def where(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"

    def problems(self) -> list[tuple[str, str]]:
        """What is wrong with these settings, as (field, problem): the client key's file and
        mode, the host key's form; nothing is connected to."""
        found: list[tuple[str, str]] = []
        if self.vagrant and not self.host_key:
            return [("host_key", f"no Vagrant machine of lab {self.vagrant} yet (no host key "
                                 f"pinned in {Path(self.key).parent / 'keys'}): run labctl "
                                 "vagrant up with this topology first")]
        key = Path(self.key)
        try:
            mode = key.stat().st_mode
        except OSError as exc:
            found.append(("key", f"cannot read the client key {key}: {exc.strerror}"))
        else:
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                found.append(("key", f"the client key {key} is readable by others "
                                     f"(mode {stat.S_IMODE(mode):o}); chmod 600 it"))
            else:
                try:
                    asyncssh.read_private_key(str(key))
                except (OSError, asyncssh.KeyImportError, ValueError) as exc:
                    found.append(("key", f"{key} is not a private key SSH can use: {exc}"))
        try:
            asyncssh.import_public_key(self.host_key)
        except (asyncssh.KeyImportError, ValueError) as exc:
            found.append(("host_key", "not a public key line like 'ssh-ed25519 AAAA...' "
                                      f"(the machine's /etc/ssh/ssh_host_*_key.pub): {exc}"))
        return found

    def port_for(self, role: str) -> int:
        """The port of a host's (``host``) or a storage node's agent on this machine."""
        if self.agent_port:
            return self.agent_port
        return names.STORAGE_AGENT_PORT if role == "storage" else names.HOST_AGENT_PORT

    def unit_for(self, role: str) -> str:
        """The playbooks' unit of a host's (``host``) or a storage node's agent: ``unit``
        when the topology named one."""
        if self.unit != DEFAULT_UNIT:
            return self.unit
        return DEFAULT_STORAGE_UNIT if role == "storage" else DEFAULT_UNIT

    def remote_python(self, state: str) -> list[str]:
        """How to run labctl's modules on the machine: the code handed over with the
        process agent (on ``PYTHONPATH``), or the playbooks' virtualenv for a unit."""
        if self.agent == "systemd":
            return [VENV_PYTHON if self.python == DEFAULT_PYTHON else self.python]
        return ["env", f"PYTHONPATH={state}/src", self.python]

    def machine(self, name: str, connect_timeout: float = 60.0) -> SshMachine:
        return SshMachine(name, self.address, Path(self.key), self.host_key, user=self.user,
                          port=self.port, pinned_by="the topology pins for it",
                          connect_timeout=connect_timeout)


def read_host_key(value: str, base: Path) -> str:
    """A host key given in a topology: the public key line itself, or the file holding it
    (relative to the topology file's directory); ValueError says why neither."""
    text = value.strip()
    if text.split(" ", 1)[0].startswith(("ssh-", "ecdsa-", "sk-")):
        return text
    path = (base / text).expanduser()
    try:
        lines = path.read_text(encoding="ascii").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"neither a public key line nor a readable file ({exc})") from None
    return lines[0].strip() if lines else ""


def state_dir(lab_tag: str, host: str) -> str:
    """The agent's directory on the machine: the lab's tag keeps two labs apart."""
    return f"{STATE_ROOT}/{lab_tag}/{host}"


class SshHosts:
    """Hosts as machines reached over SSH; ``provision`` and ``teardown`` as the namespace
    provider's."""

    #: how long teardown and a storage restart wait for a machine's SSH: one gone is said
    #: within it, and its entry stays for the next ``down``
    reach_timeout: float = 15.0

    def __init__(self, lab: str, lab_path: Path, inv: Inventory) -> None:
        self.lab = lab
        self.tag = names.lab_tag(lab, lab_path)
        self.inv = inv

    async def provision(self, plan: HostPlan, secret: bytes, access: SshAccess
                        ) -> ProvisionedHost:
        addr = str(plan.address.ip)
        port = access.port_for("host")
        if await _answers(addr, port, secret, f"host {plan.name}"):
            # an agent of this lab already serves there (up again): nothing to start
            return ProvisionedHost(plan.name, addr, port, None, None)
        await _refuse_taken(addr, port, "host", plan.name, access)
        remote = state_dir(self.tag, plan.name)
        async with access.machine(plan.name) as m:
            # journalled once the machine proved to be the one pinned and before anything is
            # made on it: a machine that never answered has nothing of the lab to remove
            self.inv.own("ssh-host", plan.name, access=access.to_json(), state_dir=remote)
            if access.agent == "systemd":
                await m.run(["mkdir", "-p", "-m", "0700", remote])
                await m.put((secret.hex() + "\n").encode(), f"{remote}/secret", mode=0o600)
                await _hand_over_guest(m, remote)
                py = access.remote_python(remote)
                await _run_unit(m, access.unit_for("host"), self.tag, [
                    *py, "-m", "labctl.agents.host", "--state-dir", remote,
                    "--secret-file", f"{remote}/secret", "--host", plan.name,
                    "--listen", f"{addr}:{port}"], {GIVEN_IMAGE_ENV: f"{remote}/guest"})
                pid = None
                log = ["journalctl", "-u", access.unit_for("host"), "-n", "30", "--no-pager"]
            else:
                await m.run(["mkdir", "-p", "-m", "0700", remote])
                await m.put((secret.hex() + "\n").encode(), f"{remote}/secret", mode=0o600)
                await _hand_over(m, remote)
                py = access.remote_python(remote)
                started = await m.run([
                    *py, "-m", "labctl.agents.remote", "start",
                    "--log", f"{remote}/agent.out", "--",
                    "env", f"{GIVEN_IMAGE_ENV}={remote}/guest", *py, "-m",
                    "labctl.agents.host", "--state-dir", remote,
                    "--secret-file", f"{remote}/secret", "--host", plan.name,
                    "--listen", f"{addr}:{port}"], timeout=60)
                pid = int(started.stdout.split()[0])
                self.inv.own("ssh-host", plan.name, access=access.to_json(), state_dir=remote,
                             pid=pid)
                log = ["tail", "-c", "1500", f"{remote}/agent.out"]
            await _wait_agent(m, addr, port, secret, f"host {plan.name}", hp.PING, log,
                              f"the host agent of {plan.name} ({access.where()})")
        return ProvisionedHost(plan.name, addr, port, pid, None)

    async def provision_storage(self, name: str, address: str, prefix: int, target_iqn: str,
                                secret: bytes, peer_secret: bytes | None, access: SshAccess
                                ) -> int | None:
        """Start the storage agent of node ``name`` on its machine: its config (a
        NodeConfig naming ``disk_dir``, with no secret in it) and the site's secret and the
        nodes' peer key as 0600 files in the lab's directory there; then the controller's
        code handed over and the agent started (``agent: process``), or the playbooks' unit
        run on those files (``agent: systemd``); then wait for its ``ping``. Returns the
        agent's PID (None: it already answered, or systemd runs it)."""
        port = access.port_for("storage")
        if await _answers(address, port, secret, f"storage node {name}", sp.PING):
            return None
        await _refuse_taken(address, port, "storage node", name, access)
        remote = state_dir(self.tag, name)
        config = {"lab": self.lab, "node": name, "address": f"{address}/{prefix}",
                  "gateway": None, "mac": "", "target_iqn": target_iqn, "agent_port": port,
                  "disk_dir": f"{remote}/disks",
                  # the machine's LIO may hold another lab's node (a datastore of the same
                  # name too): this node's backstores carry the lab's tag and the node's name
                  "backstore_prefix": f"{self.lab}.{self.tag}.{name}:"}
        async with access.machine(name) as m:
            self.inv.own("ssh-storage", name, access=access.to_json(), state_dir=remote)
            await m.run(["mkdir", "-p", "-m", "0700", remote])
            await m.put((secret.hex() + "\n").encode(), f"{remote}/secret", mode=0o600)
            args = ["--config", f"{remote}/storage.json", "--secret-file", f"{remote}/secret"]
            if peer_secret is not None:
                await m.put((peer_secret.hex() + "\n").encode(), f"{remote}/peer-secret",
                            mode=0o600)
                args += ["--peer-secret-file", f"{remote}/peer-secret"]
            if access.agent == "process":
                await _hand_over_code(m, remote)
            # the config last: teardown releases LIO's objects by it, with that code
            await m.put((json.dumps(config, indent=2) + "\n").encode(),
                        f"{remote}/storage.json", mode=0o600)
            py = access.remote_python(remote)
            if access.agent == "systemd":
                await _run_unit(m, access.unit_for("storage"), self.tag,
                                [*py, "-m", "labctl.agents.storage", *args], {})
                await _wait_agent(m, address, port, secret, f"storage node {name}", sp.PING,
                                  ["journalctl", "-u", access.unit_for("storage"), "-n", "30",
                                   "--no-pager"],
                                  f"the storage agent of {name} ({access.where()})")
                return None
            started = await m.run([
                *py, "-m", "labctl.agents.remote", "start", "--log", f"{remote}/agent.out",
                "--pidfile", f"{remote}/agent.pid", "--",
                *py, "-m", "labctl.agents.storage", *args], timeout=60)
            pid = int(started.stdout.split()[0])
            self.inv.own("ssh-storage", name, access=access.to_json(), state_dir=remote,
                         pid=pid)
            await _wait_agent(m, address, port, secret, f"storage node {name}", sp.PING,
                              ["tail", "-c", "1500", f"{remote}/agent.out"],
                              f"the storage agent of {name} ({access.where()})")
        return pid

    async def teardown(self, inv: Inventory, removed: list[str]) -> None:
        """Stop each journalled machine's agent (a host's stops its VMs softly) and remove
        what labctl made there, the hosts before the storage nodes (their sessions end
        first); a machine that cannot be reached is said, and its entry kept so that a
        later ``down`` tries again."""
        failed = []
        for kind in ("ssh-host", "ssh-storage"):
            entries = [(n, d) for k, n, d in inv.owned() if k == kind]
            results = await asyncio.gather(*(self._down(n, d, removed, kind)
                                             for n, d in entries), return_exceptions=True)
            for (name, _), res in zip(entries, results, strict=True):
                if isinstance(res, LabError):
                    failed.append(f"{name}: {res.message}")
                elif isinstance(res, BaseException):
                    raise res
                else:
                    inv.disown(kind, name)
        if failed:
            raise ProvisionError("could not tear down every SSH host: " + "; ".join(failed),
                                 hosts=failed)

    async def _down(self, name: str, detail: dict[str, Any], removed: list[str],
                    kind: str) -> None:
        access = SshAccess.from_json(detail["access"])
        remote = str(detail["state_dir"])
        try:
            async with access.machine(name, connect_timeout=self.reach_timeout) as m:
                await _stop_agent(m, name, access, remote, kind, removed)
                if access.agent == "systemd":
                    unit = access.unit_for("storage" if kind == "ssh-storage" else "host")
                    dropin = _dropin_path(unit)
                    if (await m.run(["test", "-f", dropin], check=False)).ok:
                        await m.run(["rm", "-f", dropin])
                        await m.run(["systemctl", "daemon-reload"], timeout=120)
                        removed.append(f"file {dropin} on {name}")
                await m.run(["rm", "-rf", "--one-file-system", remote])
                removed.append(f"directory {remote} on {name} ({access.where()})")
                # the lab's directory of state directories, once empty
                await m.run(["rmdir", str(Path(remote).parent)], check=False)
        except SshError as exc:
            raise ProvisionError(exc.message, host=name, **exc.evidence) from exc

    async def stop_storage(self, name: str) -> list[str]:
        """Storage node ``name``'s agent on its machine stopped and what it made in the
        machine's kernel released (its target, backstores, loop devices, NFS exports), as
        a restart of a node VM loses them; its directory is kept (its disks' files, its
        config and secrets), so :meth:`provision_storage` and the disks' ``ensure`` bring
        the same disks back. Returns one line per object stopped or released."""
        entry = next((d for k, n, d in self.inv.owned("ssh-storage") if n == name), None)
        if entry is None:
            raise ProvisionError(f"storage node {name} was not provisioned over SSH by this "
                                 "lab", node=name)
        access = SshAccess.from_json(entry["access"])
        stopped: list[str] = []
        try:
            async with access.machine(name, connect_timeout=self.reach_timeout) as m:
                await _stop_agent(m, name, access, str(entry["state_dir"]), "ssh-storage",
                                  stopped)
        except SshError as exc:
            raise ProvisionError(exc.message, node=name, **exc.evidence) from exc
        return stopped


async def _stop_agent(m: SshMachine, name: str, access: SshAccess, remote: str, kind: str,
                      removed: list[str]) -> None:
    """The machine's agent stopped (its systemd unit, or the processes its state directory
    records, with what QEMU a host's agent left); on a storage machine, what its node made
    in LIO, the loop driver and the NFS server released by its config."""
    if access.agent == "systemd":
        unit = access.unit_for("storage" if kind == "ssh-storage" else "host")
        await m.run(["systemctl", "stop", unit], timeout=120)
        removed.append(f"service {unit} on {name} ({access.where()}) stopped")
    # a process agent, and what QEMU a host's agent left either way
    got = await m.run([*access.remote_python(remote), "-m", "labctl.agents.remote", "stop",
                       "--state-dir", remote], timeout=180)
    removed.extend(f"process {line} on {name}" for line in got.stdout.splitlines()
                   if line.strip())
    config = f"{remote}/storage.json"
    if kind == "ssh-storage" and (await m.run(["test", "-f", config], check=False)).ok:
        # LIO's objects outlive the agent: its own, by its config (none was made before
        # the config was written)
        got = await m.run([*access.remote_python(remote), "-m", "labctl.agents.storage",
                           "--config", config, "--release"], timeout=180)
        removed.extend(f"{line} on {name}" for line in got.stdout.splitlines() if line.strip())


async def _wait_agent(m: SshMachine, addr: str, port: int, secret: bytes, who: str,
                      ping: Method[Any, Any], log: list[str], what: str) -> None:
    """Wait until the agent just started answers ``ping``; its log's tail in the error."""
    deadline = time.monotonic() + 30.0
    while not await _answers(addr, port, secret, who, ping):
        if time.monotonic() > deadline:
            tail = await m.run(log, check=False)
            raise ProvisionError(f"{what} did not answer at {addr}:{port} within 30 s",
                                 agent=who, log_tail=(tail.stdout + tail.stderr)[-1500:])
        await asyncio.sleep(0.2)


@functools.cache
def _code() -> bytes:
    """labctl's package and qemu.qmp (the host agent's one dependency), as a tar.gz of their
    source: what a process agent on a machine runs, the controller's own version (made
    once, for every machine of the lab)."""
    buf = io.BytesIO()
    # found, not imported: the controller never drives QEMU itself
    qmp = importlib.util.find_spec("qemu.qmp")
    if qmp is None or qmp.origin is None:
        raise ProvisionError("qemu.qmp is not installed here, and a host agent needs it: "
                             "run scripts/setup.sh")
    trees = [(Path(labctl.__file__).parent, "labctl"), (Path(qmp.origin).parent, "qemu/qmp")]
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for top, name in trees:
            for path in sorted(top.rglob("*")):
                if "__pycache__" in path.parts or path.suffix == ".pyc" or not path.is_file():
                    continue
                tar.add(path, arcname=f"{name}/{path.relative_to(top)}", recursive=False)
    return buf.getvalue()


async def _hand_over_code(m: SshMachine, remote: str) -> None:
    """labctl's code into the agent's directory (``src/``): the controller's own version."""
    await m.put(_code(), f"{remote}/src.tar.gz", mode=0o600)
    await m.run(["rm", "-rf", f"{remote}/src"])
    await m.run(["mkdir", "-m", "0700", f"{remote}/src"])
    await m.run(["tar", "-xzf", f"{remote}/src.tar.gz", "-C", f"{remote}/src"])
    await m.run(["rm", "-f", f"{remote}/src.tar.gz"])


async def _hand_over(m: SshMachine, remote: str) -> None:
    """The code and the test guest (kernel, initrd) into the agent's directory: the
    machine needs Python 3, QEMU and libiscsi, and neither builds nor downloads anything."""
    await _hand_over_code(m, remote)
    await _hand_over_guest(m, remote)


async def _hand_over_guest(m: SshMachine, remote: str) -> None:
    """The test guest (kernel, initrd) into the agent's directory (``guest/``)."""
    image = await ensure_guest_image()
    await m.run(["mkdir", "-p", "-m", "0700", f"{remote}/guest"])
    for local, name in ((image.kernel, "vmlinuz"), (image.initrd, "initrd.img")):
        await m.put(local.read_bytes(), f"{remote}/guest/{name}", mode=0o600)
    await m.put(f"{image.recipe_hash}\n".encode(), f"{remote}/guest/recipe", mode=0o600)


#: the drop-in labctl writes for a unit it runs (``agent: systemd``): the unit's own
#: command replaced by the lab's, on the lab's files; removed at teardown
DROPIN = "50-labctl-lab.conf"
_UNIT_WORD = re.compile(r"[A-Za-z0-9_./:=@+-]+")


def _dropin_path(unit: str) -> str:
    return f"/etc/systemd/system/{unit}.d/{DROPIN}"


def dropin_text(tag: str, argv: list[str], env: dict[str, str]) -> str:
    """The drop-in that runs ``argv`` (with ``env``) instead of the unit's own command.
    Each word must be one systemd reads as itself (no blank, quote, ``%``, ``$`` or
    backslash: nothing there is expanded or split); ValueError names one that is not."""
    for word in [*argv, *(f"{k}={v}" for k, v in env.items())]:
        if not _UNIT_WORD.fullmatch(word):
            raise ValueError(f"{word!r} cannot be written in a unit as it is")
    lines = [f"# labctl lab {tag}: written by labctl up, removed by labctl down",
             "[Service]", "ExecStart=", "ExecStart=" + " ".join(argv)]
    lines += [f"Environment={k}={v}" for k, v in env.items()]
    return "\n".join(lines) + "\n"


async def _run_unit(m: SshMachine, unit: str, tag: str, argv: list[str],
                    env: dict[str, str]) -> None:
    """``unit`` (the playbooks') restarted to run ``argv`` on the lab's files, through a
    drop-in; a drop-in another lab left there is a refusal, not overwritten."""
    path = _dropin_path(unit)
    there = await m.run(["cat", path], check=False)
    if there.ok and f"# labctl lab {tag}:" not in there.stdout:
        first = there.stdout.splitlines()[0] if there.stdout else ""
        raise ProvisionError(f"{m.name}: {unit} runs another lab's agent ({first.lstrip('# ')}"
                             f"): bring that lab down first", machine=m.name, unit=unit)
    try:
        text = dropin_text(tag, argv, env)
    except ValueError as exc:
        raise ProvisionError(f"{m.name}: {exc}", machine=m.name, unit=unit) from None
    await m.run(["mkdir", "-p", "-m", "0755", str(Path(path).parent)])
    await m.put(text.encode(), path, mode=0o644)
    await m.run(["systemctl", "daemon-reload"], timeout=120)
    await m.run(["systemctl", "restart", unit], timeout=120)


async def _refuse_taken(addr: str, port: int, role: str, name: str, access: SshAccess
                        ) -> None:
    """Refuse, before anything is made on the machine, a port where something listens
    that is not this lab's agent (``_answers`` said no): another lab's agent on the same
    machine, most likely. Starting ours would fail to listen, or take the other's place."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), 2.0)
    except (OSError, TimeoutError):
        return  # nothing listens there: the port is free for this lab's agent
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise ProvisionError(
        f"{role} {name} ({access.where()}): port {port} of {addr} is taken by something that "
        "is not this lab's agent (another lab's on the same machine?): give this lab's "
        f"{role} another agent_port in its ssh settings", agent=f"{role} {name}", port=port)


async def _answers(addr: str, port: int, secret: bytes, who: str,
                   ping: Method[Any, Any] = hp.PING) -> bool:
    try:
        client = await RpcClient.connect(addr, port, secret, timeout=2.0, peer=who)
    except AgentError:  # nothing there, or an agent of another lab
        return False
    try:
        with contextlib.suppress(LabError):
            await ping.call(client, timeout=5)
            return True
        return False
    finally:
        await client.close()
