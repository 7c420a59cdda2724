"""The storage node's and router's PID 1 (``images/storage/init.py``): it reaps every
orphan, and never the programs its agent waits for.

The supervisor runs in a helper process made a child subreaper, so orphans come to it as
they come to PID 1 in a node VM. Nothing here mounts, loads modules or powers off."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

INIT = Path(__file__).resolve().parents[3] / "images" / "storage" / "init.py"

HELPER = textwrap.dedent("""
    import asyncio, ctypes, importlib.util, json, os, sys
    spec = importlib.util.spec_from_file_location("nodeinit", sys.argv[1])
    init = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(init)
    PR_SET_CHILD_SUBREAPER = 36
    assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    out = sys.argv[2]

    def children(parent, state=None):
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    stat = open(f"/proc/{pid}/stat").read()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[1]) == parent and state in (None, fields[0]):
                    found.append(int(pid))
        return found

    async def agent():
        codes = []
        for i in range(150):
            # an orphan a second process leaves behind ends meanwhile, as rpcbind's and
            # mountd's forks do: PID 1 reaps it while the agent waits for its own program
            await (await asyncio.create_subprocess_exec(
                "sh", "-c", "(sleep 0.001; exit 7) & exit 0")).wait()
            p = await asyncio.create_subprocess_exec(
                "sh", "-c", f"exit {i % 5 + 1}", stdout=asyncio.subprocess.PIPE)
            await p.communicate()
            codes.append(p.returncode)
        with open(out, "w") as f:
            json.dump(codes, f)
        for _ in range(1000):  # the last orphans end, so that none is left to the test
            if children(os.getppid()) == [os.getpid()]:
                break
            await asyncio.sleep(0.01)
        if os.environ.get("FAIL_AGENT"):
            raise RuntimeError("the agent broke")

    status = init.supervise(lambda: asyncio.run(agent()))
    zombies = children(os.getpid(), "Z")
    print(json.dumps({"status": os.waitstatus_to_exitcode(status), "zombies": zombies,
                      "supervisor": os.getpid()}))
""")


def _supervise(tmp_path: Path, fail: bool = False) -> tuple[dict[str, object], list[int], str]:
    out = tmp_path / "codes.json"
    env = {"PATH": "/usr/bin:/bin", **({"FAIL_AGENT": "1"} if fail else {})}
    res = subprocess.run([sys.executable, "-c", HELPER, str(INIT), str(out)],
                         capture_output=True, text=True, timeout=120, env=env, check=True)
    return json.loads(res.stdout.splitlines()[-1]), json.loads(out.read_text()), res.stdout


def test_the_agent_s_programs_keep_their_exit_status_while_orphans_are_reaped(
        tmp_path: Path) -> None:
    got, codes, _ = _supervise(tmp_path)
    # a waitpid(-1) in the agent's own process took some of these: asyncio reported 255
    assert codes == [i % 5 + 1 for i in range(150)]
    assert got["status"] == 0
    assert got["zombies"] == []


def test_an_agent_that_fails_is_said_and_its_status_returned(tmp_path: Path) -> None:
    got, codes, stdout = _supervise(tmp_path, fail=True)
    assert len(codes) == 150
    assert got["status"] == 1
    assert "labctl-storage: agent: RuntimeError: the agent broke" in stdout


def test_an_agent_whose_status_was_taken_elsewhere_is_said_not_taken_for_success() -> None:
    # SIGCHLD ignored: the kernel reaps the agent itself, and wait() finds no child
    code = textwrap.dedent("""
        import importlib.util, signal, sys
        spec = importlib.util.spec_from_file_location("nodeinit", sys.argv[1])
        init = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(init)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        try:
            print(init.supervise(lambda: None))
        except init.InitError as exc:
            print(f"refused: {exc}")
    """)
    res = subprocess.run([sys.executable, "-c", code, str(INIT)], capture_output=True,
                         text=True, timeout=60, check=True)
    said = res.stdout.strip().splitlines()[-1]
    assert said.startswith("refused: the agent (pid ") and said.endswith(
        ") ended and its status was lost"), res.stdout
