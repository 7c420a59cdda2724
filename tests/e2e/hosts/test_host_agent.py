"""The host agent, end to end: a real agent process in a throwaway network namespace."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from labctl.core.errors import AuthenticationFailed, LabError, RemoteError
from labctl.core.rpc import RpcClient
from tests.conftest import free_subnet

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (run scripts/setup.sh)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    lab_dir: Path
    address: str
    port: int
    secret: bytes

    @property
    def state_dir(self) -> Path:
        return self.lab_dir / "hosts" / "h1"


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


@pytest.fixture
def agent(tmp_path: Path, lab_home: Path) -> Iterator[AgentProc]:
    tag = secrets.token_hex(3)
    ns, outer, inner = f"lctest{tag}", f"lct{tag}o", f"lct{tag}i"
    net = free_subnet()  # a /30 of it: the veth's two ends
    host_ip, agent_ip = str(net[1]), str(net[2])
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    secret = secrets.token_bytes(32)
    (lab_dir / "secret").write_text(secret.hex() + "\n")
    proc: subprocess.Popen[bytes] | None = None
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "addr", "add", f"{agent_ip}/30", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", "--", sys.executable, "-m",
             "labctl.agents.host", "--state-dir", str(lab_dir / "hosts" / "h1"),
             "--secret-file", str(lab_dir / "secret"), "--host", "h1",
             "--listen", f"{agent_ip}:7600"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log = lab_dir / "hosts" / "h1" / "agent.log"
        deadline = time.monotonic() + 30
        while not (log.exists() and "listening on" in log.read_text()):
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"the agent exited at once ({proc.returncode}): {out}")
            assert time.monotonic() < deadline, "the agent did not start within 30 s"
            time.sleep(0.05)
        yield AgentProc(proc, lab_dir, agent_ip, 7600, secret)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()  # the PID this fixture started
                proc.wait()
        _ip("link", "del", outer, check=False)
        _ip("netns", "del", ns, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def _connect(a: AgentProc, secret: bytes | None = None) -> RpcClient:
    return await RpcClient.connect(a.address, a.port, secret or a.secret, peer="host h1")


def test_host_agent_end_to_end(agent: AgentProc, tmp_path: Path) -> None:
    disk = tmp_path / "vm1.raw"
    disk.write_bytes(bytes(1 << 20))

    async def scenario() -> tuple[int, int]:
        with pytest.raises(AuthenticationFailed):
            await _connect(agent, secrets.token_bytes(32))
        async with await _connect(agent) as c:
            info = await c.call("ping")
            assert info["host"] == "h1" and info["pid"] == agent.proc.pid
            assert str(info["qemu_version"]).startswith(("9.", "10.", "11."))

            with pytest.raises(RemoteError) as unknown:
                await c.call("vm_status", name="nope")
            assert unknown.value.remote_type == "LabStateError"
            with pytest.raises(RemoteError):
                await c.call("vm_start", spec={"name": "bad name!"})

            started = await c.call("vm_start", timeout=120, spec={
                "name": "vm1", "memory_mib": 192, "accel": "tcg", "rate_mib_s": 5,
                "wss_mib": 32, "disk": {"kind": "file", "path": str(disk)}})
            assert started["name"] == "vm1" and started["pid"] > 0
            assert 0 < started["first_heartbeat_s"] < 60
            qemu_pid = int(started["pid"])
            run_dir = Path(started["run_dir"])
            assert run_dir == agent.state_dir / "vms" / "vm1"
            assert (run_dir / "console.log").exists()
            assert int((run_dir / "qemu.pid").read_text()) == qemu_pid

            with pytest.raises(RemoteError) as dup:
                await c.call("vm_start", spec={"name": "vm1", "accel": "tcg"})
            assert dup.value.remote_type == "LabStateError"

            s1 = await c.call("vm_status", name="vm1")
            await asyncio.sleep(1.2)
            s2 = await c.call("vm_status", name="vm1")
            assert s2["state"] == "running" and s2["pid"] == qemu_pid
            assert s2["heartbeat"]["counter"] >= s1["heartbeat"]["counter"] + 8
            assert s2["heartbeat"]["age_s"] < 1.0
            assert s2["disk_counter"] >= 1

            assert (await c.call("vm_console", name="vm1", command="rate 20"))["answer"] == \
                "OK rate 20"
            assert (await c.call("vm_console", name="vm1", command="sync"))["answer"].startswith(
                "DISK wrote ")
            with pytest.raises(RemoteError):
                await c.call("vm_console", name="vm1", command="reboot now")
            tail = (await c.call("vm_console_tail", name="vm1", lines=5))["lines"]
            assert len(tail) == 5 and any(t.startswith(("HB ", "DISK wrote")) for t in tail)
            assert [v["name"] for v in (await c.call("vm_list"))["vms"]] == ["vm1"]

            # a unit behind a portal nobody answers: reported unreachable, the agent goes on
            scanned = await c.call("storage_attach", timeout=90, units=[{
                "naa": "naa.6001405" + "0" * 25, "portal": "10.231.250.250:3260",
                "target_iqn": "iqn.2003-01.org.example:none", "lun": 0,
                "initiator_iqn": "iqn.2024-01.org.labctl:h1"}])
            unit = scanned["units"][0]
            assert unit["state"] == "unreachable" and unit["error"]

            stopped = await c.call("vm_stop", name="vm1", timeout=60)
            assert stopped["returncode"] is not None
            assert not _pid_alive(qemu_pid)
            assert (await c.call("vm_list"))["vms"] == []

            # a VM left running is stopped when the agent gets SIGTERM
            started2 = await c.call("vm_start", timeout=120, spec={
                "name": "vm2", "memory_mib": 128, "accel": "tcg", "wss_mib": 8})
            return qemu_pid, int(started2["pid"])

    _, pid2 = asyncio.run(scenario())
    assert _pid_alive(pid2)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(30) == 0
    assert not _pid_alive(pid2)
    assert not (agent.state_dir / "agent.pid").exists()
    assert "stopped" in (agent.state_dir / "agent.log").read_text()


def test_agent_refuses_bad_secret_file(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "secret").write_text("not hex\n")
    (lab / "secret").chmod(0o600)
    from labctl.core.secret import read_secret

    with pytest.raises(LabError, match="secret"):
        read_secret(lab / "secret")
    # the agent itself: one line naming the problem, exit 1, no traceback, nothing listening
    res = subprocess.run([sys.executable, "-m", "labctl.agents.host", "--state-dir",
                          str(lab / "state"), "--secret-file", str(lab / "secret"),
                          "--host", "h1", "--listen", "127.0.0.1:39999"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "secret" in lines[0] and "Traceback" not in res.stderr, lines
