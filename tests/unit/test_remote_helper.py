"""``python -m labctl.agents.remote``, what the controller runs on a machine over SSH:
start a detached agent, stop it and the QEMUs it left by their directory, run a command
with an environment read from standard input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from labctl.core.proc import cmdline_names


def _remote(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labctl.agents.remote", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of this test's is not running
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _sleeper(state: Path, pidfile: Path) -> list[str]:
    # writes its pidfile, as the host agent and QEMU do, then sleeps; its command line names
    # the state directory
    code = ("import os,sys,time; open(sys.argv[1],'w').write(str(os.getpid())); "
            "time.sleep(600)")
    return [sys.executable, "-c", code, str(pidfile), str(state)]


def test_start_detaches_and_stop_ends_what_names_the_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "vms" / "vm1").mkdir(parents=True)
    res = _remote("start", "--log", str(state / "agent.out"), "--",
                  *_sleeper(state, state / "agent.pid"))
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout.split()[0])
    qemu = subprocess.Popen(_sleeper(state, state / "vms" / "vm1" / "qemu.pid"),
                            start_new_session=True)
    # a process whose pid is in a pidfile but whose command line does not name the
    # directory is not touched (a PID reused by someone else)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (state / "vms" / "vm2").mkdir()
    (state / "vms" / "vm2" / "qemu.pid").write_text(str(other.pid))
    try:
        for _ in range(100):
            if (state / "agent.pid").exists() and (state / "vms/vm1/qemu.pid").exists():
                break
            time.sleep(0.05)
        assert cmdline_names(pid, state)
        # it is in a session of its own: the SSH session's end does not take it along
        assert os.getsid(pid) == pid
        stopped = _remote("stop", "--state-dir", str(state), "--grace", "5")
        assert stopped.returncode == 0, stopped.stderr
        lines = stopped.stdout.splitlines()
        assert lines == [f"agent (pid {pid})", f"qemu:vm1 (pid {qemu.pid})"], lines
        qemu.wait(5)
        assert not cmdline_names(pid, state)
        assert _alive(other.pid)
    finally:
        other.kill()
        other.wait()
        qemu.kill()
        qemu.wait()


def test_stop_of_an_empty_directory_is_nothing(tmp_path: Path) -> None:
    res = _remote("stop", "--state-dir", str(tmp_path))
    assert res.returncode == 0 and res.stdout == ""


def test_exec_takes_its_environment_from_stdin(tmp_path: Path) -> None:
    env = {"LIBISCSI_CHAP_PASSWORD": "s3cret", "LABCTL_HOST": "h1"}
    res = _remote("exec", "--", sys.executable, "-c",
                  "import os; print(os.environ['LIBISCSI_CHAP_PASSWORD'], "
                  "os.environ['LABCTL_HOST']); raise SystemExit(3)",
                  stdin=json.dumps(env) + "\n")
    assert res.returncode == 3 and res.stdout.split() == ["s3cret", "h1"]
    bad = _remote("exec", "--", "true", stdin='["not", "an", "object"]\n')
    assert bad.returncode == 2 and "not an object of strings" in bad.stderr
    missing = _remote("exec", "--", str(tmp_path / "nothing"), stdin="{}\n")
    assert missing.returncode == 127 and "cannot run" in missing.stderr


def test_start_writes_the_pidfile_of_an_agent_that_writes_none(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    res = _remote("start", "--log", str(state / "agent.out"), "--pidfile",
                  str(state / "agent.pid"), "--", sys.executable, "-c",
                  "import time; time.sleep(600)", str(state))
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout.split()[0])
    try:
        assert (state / "agent.pid").read_text().strip() == str(pid)
        assert (state / "agent.pid").stat().st_mode & 0o777 == 0o600
        stopped = _remote("stop", "--state-dir", str(state), "--grace", "5")
        assert stopped.stdout.splitlines() == [f"agent (pid {pid})"], stopped.stdout
    finally:
        if _alive(pid):
            os.kill(pid, 9)
