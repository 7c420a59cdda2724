"""The replication's guest application on a real filesystem: records are acknowledged only
once durable, a kill at any moment loses nothing acknowledged, a torn tail is cut off and
numbering carries on, and a damaged acknowledged record is refused as lost data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from labctl.replication import app

APP = Path(app.__file__)


def _start(directory: Path, rate: str = "2MiB/s") -> subprocess.Popen[str]:
    # -S -I: as in the guest, the file alone and the standard library
    return subprocess.Popen([sys.executable, "-S", "-I", str(APP), "run", "--dir",
                             str(directory), "--rate", rate], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _until_acked(directory: Path, at_least: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seq = app.read_acked(directory).seq
        if seq >= at_least:
            return seq
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} records acknowledged in {timeout} s")


def test_records_are_written_at_the_rate_and_acknowledged(tmp_path: Path) -> None:
    last = app.run(tmp_path, 1 << 20, stop_after=1.0)  # 256 records a second
    state = app.verify(tmp_path)
    assert state == {"records": last, "last_acked": last, "acked_at": state["acked_at"],
                     "first_bad": None, "ok": True}
    assert 100 <= last <= 300, last  # the rate is followed: about 256 records in a second
    acks = [line.split() for line in (tmp_path / "acks.log").read_text().splitlines()]
    assert int(acks[-1][0]) == last and all(float(a[1]) > 1.7e9 for a in acks)


def test_a_writer_behind_writes_a_second_at_a_time_and_makes_nothing_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its clock jumps 100 s (a guest whose CPU the replication took): the next batch is
    one second's records, not 100 seconds' built in memory at once."""
    clock = [1000.0]
    batches: list[int] = []
    real_append = app._append

    def tick() -> float:
        clock[0] += 100.0 if len(batches) == 2 else 0.05
        return clock[0]

    def append(fd: int, data: bytes) -> None:
        if len(data) % app.RECORD == 0 and data[:4] == app.MAGIC:
            batches.append(len(data) // app.RECORD)
        real_append(fd, data)

    monkeypatch.setattr(app.time, "monotonic", tick)
    monkeypatch.setattr(app.time, "sleep", lambda s: None)
    monkeypatch.setattr(app, "_append", append)
    last = app.run(tmp_path, 256 * app.RECORD, stop_after=101.0)  # 256 records a second
    assert max(batches) == 256 and batches[2] == 256, batches
    assert sum(batches) == last < 2 * 256 + 100, batches  # the 100 s are not made up
    assert app.verify(tmp_path)["ok"]


def test_sigterm_stops_after_the_batch_and_says_what_was_acknowledged(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    _until_acked(tmp_path, 20)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert json.loads(out)["last_acked"] == app.read_acked(tmp_path).seq
    assert app.verify(tmp_path)["ok"]


def test_a_kill_at_any_moment_loses_nothing_acknowledged(tmp_path: Path) -> None:
    for round_ in range(3):
        proc = _start(tmp_path, "8MiB/s")
        before = app.read_acked(tmp_path).seq
        _until_acked(tmp_path, before + 30)
        time.sleep(0.013 * (round_ + 1))  # somewhere in a batch
        proc.kill()
        proc.wait(timeout=20)
        state = app.verify(tmp_path)
        assert state["ok"], state  # every acknowledged record intact, in order
        assert int(str(state["records"])) >= int(str(state["last_acked"])) > before


def test_a_torn_tail_is_cut_off_and_numbering_carries_on(tmp_path: Path) -> None:
    last = app.run(tmp_path, 1 << 20, stop_after=0.3)
    with open(tmp_path / "records", "ab") as f:  # a crash tore the next record
        f.write(app.record(last + 1, time.time_ns())[:1000])
    state = app.verify(tmp_path)
    assert state["ok"] and state["first_bad"] == f"record {last + 1}: short record (1000 bytes)"
    more = app.run(tmp_path, 1 << 20, stop_after=0.3)
    assert more > last
    assert app.verify(tmp_path) == {"records": more, "last_acked": more,
                                    "acked_at": app.read_acked(tmp_path).at,
                                    "first_bad": None, "ok": True}


def test_a_log_longer_than_what_was_written_is_cut_to_its_last_line(tmp_path: Path) -> None:
    """After a power cut ext4 may give an appended file its new length with zeros in it:
    the application's own log keeps only its whole lines, then goes on."""
    last = app.run(tmp_path, 1 << 20, stop_after=0.3)
    with open(tmp_path / "acks.log", "ab") as f:
        f.write(b"12")  # half a line
        f.write(bytes(5000))
    more = app.run(tmp_path, 1 << 20, stop_after=0.3)
    lines = (tmp_path / "acks.log").read_text().splitlines()
    seqs = [int(ln.split()[0]) for ln in lines]  # every line whole again
    assert last in seqs and seqs[-1] == more and seqs == sorted(seqs)


def test_a_damaged_acknowledged_record_is_lost_data(tmp_path: Path) -> None:
    app.run(tmp_path, 1 << 20, stop_after=0.3)
    with open(tmp_path / "records", "r+b") as f:
        f.seek(2 * app.RECORD + 100)  # inside record 3
        byte = f.read(1)
        f.seek(2 * app.RECORD + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    state = app.verify(tmp_path)
    assert not state["ok"] and state["records"] == 2
    assert state["first_bad"] == "record 3: checksum mismatch"
    res = subprocess.run([sys.executable, "-S", "-I", str(APP), "verify", "--dir",
                          str(tmp_path)], capture_output=True, text=True, check=False)
    assert res.returncode == 1 and json.loads(res.stdout)["first_bad"] == state["first_bad"]
    with pytest.raises(SystemExit, match=r"acknowledged record .* is not there .* data was lost"):
        app.run(tmp_path, 1 << 20, stop_after=0.1)


def _flip(directory: Path, seq: int) -> None:
    """One byte of record ``seq`` changed."""
    with open(directory / "records", "r+b") as f:
        f.seek((seq - 1) * app.RECORD + 100)
        byte = f.read(1)
        f.seek((seq - 1) * app.RECORD + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_tail_check_reads_from_the_last_ack_and_the_whole_is_checked_after(
        tmp_path: Path) -> None:
    """``resume --check tail`` (a cutover's destination: its outage is not spent reading
    every record) checks the last acknowledged record and what follows it; ``verify
    --upto N`` then checks records 1 to N against the source's acknowledgement N while
    the writer appends. A damaged record before the last ack gets past the first and not
    the second; a damaged last ack gets past neither."""
    last = app.run(tmp_path, 1 << 20, stop_after=0.3)
    with open(tmp_path / "records", "ab") as f:
        f.write(app.record(last + 1, 0)[:1000])  # a torn tail past the last ack
    tail = app.verify(tmp_path, tail=True)
    assert tail["ok"] and tail["checked_from"] == last and tail["records"] == last, tail
    assert tail["first_bad"] == f"record {last + 1}: short record (1000 bytes)"
    _flip(tmp_path, 3)
    assert app.verify(tmp_path, tail=True)["ok"]  # not read: checked after the start
    whole = app.verify(tmp_path, upto=last)
    assert not whole["ok"] and whole["first_bad"] == "record 3: checksum mismatch", whole
    assert whole["last_acked"] == last
    # mended; the writer starts on the tail's check, cuts the torn tail, appends, and the
    # whole up to the source's ack is checked while it writes
    _flip(tmp_path, 3)
    (tmp_path / "app.json").write_text(json.dumps({"rate": 1 << 20}))
    started = subprocess.run([sys.executable, "-S", "-I", str(APP), "resume", "--dir",
                              str(tmp_path), "--check", "tail"], capture_output=True,
                             text=True, timeout=20, check=False)
    try:
        assert started.returncode == 0, started.stderr
        got = json.loads(started.stdout)["verified"]
        assert got["ok"] and got["checked_from"] == app.read_acked(tmp_path).seq, got
        _until_acked(tmp_path, got["last_acked"] + 1)
        checked = app.verify(tmp_path, upto=last)  # while it writes on
        assert checked["ok"] and checked["records"] == last, checked
    finally:
        app.stop(tmp_path)
    # the last acknowledged record damaged: the tail check refuses the start
    _flip(tmp_path, app.read_acked(tmp_path).seq)
    refused = subprocess.run([sys.executable, "-S", "-I", str(APP), "resume", "--dir",
                              str(tmp_path), "--check", "tail"], capture_output=True,
                             text=True, timeout=20, check=False)
    assert refused.returncode != 0 and "acknowledged data is missing" in refused.stderr


def test_a_record_is_rebuilt_from_its_number() -> None:
    block = app.record(7, 123)
    assert len(block) == app.RECORD and app.check(block, 7) is None
    assert app.check(block, 8) == "sequence number 7, expected 8"
    assert app.check(b"\0" * app.RECORD, 1) == "no record (bad magic)"
    assert app.parse_rate("1MiB/s") == 1 << 20 and app.parse_rate("512K") == 512 << 10
    assert os.path.basename(app.__file__) == "app.py"


def test_in_the_background_it_detaches_and_stops_when_asked(tmp_path: Path) -> None:
    """``run --background`` returns at once with the daemon's pid (stdio to app.log: an SSH
    session that started it can end); ``stop`` ends it after its batch, with its last ack."""
    res = subprocess.run([sys.executable, "-S", "-I", str(APP), "run", "--dir", str(tmp_path),
                          "--rate", "1MiB/s", "--background"], capture_output=True, text=True,
                         timeout=20, check=True)
    pid = json.loads(res.stdout)["pid"]
    recorded = (tmp_path / "app.pid").read_text().split()
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert recorded == [str(pid), boot, "-"]  # the pid, its boot, a disk not full
    # one line of fixed width, rewritten in place: a full disk has no block for a new one
    assert len((tmp_path / "app.pid").read_bytes()) == 128
    _until_acked(tmp_path, 20)
    assert app.alive(pid) and app.daemon(tmp_path) == pid  # it runs on after the caller
    # a pid file of another boot names no writer, even where that pid runs this program
    (tmp_path / "app.pid").write_text(f"{pid} 00000000-0000-0000-0000-000000000000\n")
    assert app.daemon(tmp_path) is None
    (tmp_path / "app.pid").write_text(f"{pid} {boot}\n")
    res = subprocess.run([sys.executable, "-S", "-I", str(APP), "stop", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=20, check=True)
    stopped = json.loads(res.stdout)
    assert stopped["stopped"] and not stopped["killed"] and stopped["last_acked"] >= 20
    assert not app.alive(pid)
    assert app.verify(tmp_path)["ok"] and app.daemon(tmp_path) is None
    # the pid file stays, naming no writer (its block is kept for the next start)
    assert (tmp_path / "app.pid").read_text().split()[0] == "0"
    assert app.status(tmp_path)["writer"] is None


def test_a_writer_that_does_not_stop_is_killed_before_its_ack_is_read(tmp_path: Path) -> None:
    """``stop`` reads the last acknowledgement only once the writer is gone: one that
    ignores SIGTERM past the timeout is killed first (it used to be reported stopped while
    it could still acknowledge a batch, after the cutover had read the source's last)."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    # a writer's command line (app.py run), whose SIGTERM is ignored
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal("
                                 "signal.SIGTERM, signal.SIG_IGN); print('', flush=True); "
                                 "time.sleep(60)", str(APP), "run"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == "\n"
        app.write_pid(tmp_path, app.PidFile(stubborn.pid, boot, 1234.5))
        assert app.daemon(tmp_path) == stubborn.pid
        got = app.stop(tmp_path, timeout=0.5)
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert got["stopped"] and got["killed"] and got["full_since"] == 1234.5, got
    finally:
        stubborn.kill()
        stubborn.wait()


def test_a_pid_file_naming_the_command_itself_is_no_writer(tmp_path: Path) -> None:
    """A guest boots the same way each time: the command started to run the writer again
    can get the pid the writer of the earlier boot recorded. It is not a writer, and
    ``run --background`` starts one (it used to refuse: "already written by pid N")."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import app, os, pathlib; "
             "d = pathlib.Path(sys.argv[2]); "
             "boot = pathlib.Path('/proc/sys/kernel/random/boot_id').read_text().strip(); "
             "(d / 'app.pid').write_text(f'{os.getpid()} {boot}'); print(app.daemon(d))")
    # its command line names app.py, as the real one's does: only its own pid tells it
    got = subprocess.run([sys.executable, "-S", "-I", "-c", probe, str(APP.parent),
                          str(tmp_path), str(APP)], capture_output=True, text=True,
                         timeout=20, check=True)
    assert got.stdout.strip() == "None", got


def test_only_a_running_writer_is_the_writer(tmp_path: Path) -> None:
    """A pid file names the writer only when that process runs ``app.py run`` or ``app.py
    resume``: ``app.py status`` under a reused pid of the same boot holds the name but
    writes nothing, and a stop must not end it."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = {cmd: subprocess.Popen([*sleeper, str(APP), cmd, "--dir", str(tmp_path)])
             for cmd in ("status", "verify", "run", "resume")}
    try:
        for cmd, proc in procs.items():
            (tmp_path / "app.pid").write_text(f"{proc.pid} {boot}\n")
            want = proc.pid if cmd in ("run", "resume") else None
            assert app.daemon(tmp_path) == want, cmd
        (tmp_path / "app.pid").write_text(f"{procs['status'].pid} {boot}\n")
        assert app.stop(tmp_path)["stopped"] is False
        assert procs["status"].poll() is None  # not signalled
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_a_resume_checks_every_record_once_and_says_what_it_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``resume`` (a cutover's destination) verifies the records once, in the caller,
    prints that check with the daemon's pid, and the daemon does not read them again; with
    acknowledged data missing it refuses, the check as JSON after its reason."""
    app.run(tmp_path, 4 << 20, stop_after=0.3)
    (tmp_path / "app.json").write_text(json.dumps({"rate": 1 << 20}))  # as a run left it
    res = subprocess.run([sys.executable, "-S", "-I", str(APP), "resume", "--dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=20, check=True)
    out = json.loads(res.stdout)
    acked = app.read_acked(tmp_path).seq
    assert out["verified"]["ok"] and out["verified"]["records"] >= out["verified"]["last_acked"]
    _until_acked(tmp_path, acked + 1)
    subprocess.run([sys.executable, "-S", "-I", str(APP), "stop", "--dir", str(tmp_path)],
                   capture_output=True, check=True, timeout=20)
    assert app.read_acked(tmp_path).seq > acked  # it ran on
    # the daemon's run() starts on the check it is handed, without reading the records
    calls: list[Path] = []
    monkeypatch.setattr(app, "verify", lambda d: calls.append(d) or {"ok": True})
    checked = {"ok": True, "records": app.read_acked(tmp_path).seq}
    app.run(tmp_path, 1 << 20, stop_after=0.1, checked=checked)
    assert calls == []
    monkeypatch.undo()
    # data lost: refused, and the check is there for the caller to parse
    with open(tmp_path / "records", "r+b") as f:
        f.truncate(app.RECORD)
    res = subprocess.run([sys.executable, "-S", "-I", str(APP), "resume", "--dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=20)
    assert res.returncode != 0 and "acknowledged data is missing" in res.stderr
    said = json.loads(res.stderr[res.stderr.index("{"):])
    assert said["ok"] is False and said["records"] == 1


_ON_A_SMALL_DISK = """
import json, subprocess, sys
fs, app = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "labctl-test-fs", fs], check=True)
run = subprocess.run([sys.executable, "-S", "-I", app, "run", "--dir", fs, "--rate", "2MiB/s",
                      "--seconds", "1.5"], capture_output=True, text=True, check=False)
verify = subprocess.run([sys.executable, "-S", "-I", app, "verify", "--dir", fs],
                        capture_output=True, text=True, check=False)
with open(fs + "/acks.log") as f:
    log = f.read()
print(json.dumps({"rc": run.returncode, "err": run.stderr, "verify": verify.stdout,
                  "log": log}))
"""


def _on_a_small_disk(tmp_path: Path, script: str) -> Any:
    """``script``'s JSON, run with a 256 KiB tmpfs of its own (a mount namespace of its own)
    and this file's application: ``sys.argv[1:]``."""
    fs = tmp_path / "fs"
    fs.mkdir()
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", script, str(fs), str(APP)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a small file system of its own")
def test_a_full_disk_acknowledges_only_what_it_holds(tmp_path: Path) -> None:
    """A disk that fills mid-batch (a short write, then ENOSPC): the application keeps
    running, acknowledges no record it could not make durable, and everything it did
    acknowledge is there. A 256 KiB tmpfs in a mount namespace of the test's own."""
    got = _on_a_small_disk(tmp_path, _ON_A_SMALL_DISK)
    assert got["rc"] == 0, got  # it ran on, refusing writes, until asked to stop
    assert "no space left on the disk" in got["err"], got
    state = json.loads(got["verify"])
    assert state["ok"], state  # nothing acknowledged is missing
    assert 0 < state["last_acked"] <= state["records"] < 64, state  # 256 KiB of 4 KiB records
    # its own log: whole lines (a line the disk tore is cut), in order, none past what it
    # acknowledged (a line the disk had no room for is missing, never half there)
    seqs = [int(line.split()[0]) for line in got["log"].splitlines()]
    assert all(len(line.split()) == 2 for line in got["log"].splitlines()), got["log"]
    assert seqs and seqs == sorted(seqs) and seqs[-1] <= state["last_acked"], got["log"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a small file system of its own")
def test_a_replica_of_a_disk_full_to_its_last_byte_starts_and_says_it_is_full(
        tmp_path: Path) -> None:
    """As a cutover does on the replica of a full disk: the writer in the background fills
    it, is stopped, the rest of the disk is filled to its last byte; ``resume`` checks the
    records and starts (it used to die replacing app.json: "the records do not match"),
    ``status`` says since when the disk has been full, ``stop`` stops it, and nothing is
    lost or left behind. A 256 KiB tmpfs in a mount namespace of the test's own."""
    got = _on_a_small_disk(tmp_path, _RESUMED_ON_A_FULL_DISK)
    assert got["filled"] == 28, got  # ENOSPC: not a byte left
    first = got["first"]
    assert first["full_since"] is not None and first["writer"] is not None, got
    assert got["stopped_first"]["stopped"] and not got["stopped_first"]["killed"], got
    started = json.loads(got["resume"]["out"])
    assert got["resume"]["rc"] == 0, got
    acked = got["stopped_first"]["last_acked"]
    assert started["verified"]["ok"] and started["verified"]["last_acked"] == acked, got
    st = got["status"]
    assert st["writer"] == started["pid"] and st["full_since"] is not None, got
    assert st["last_acked"] == acked, got  # nothing acknowledged on a full disk
    assert got["stopped"]["stopped"] and got["stopped"]["last_acked"] == acked, got
    assert json.loads(got["verify"])["ok"], got
    assert not [n for n in got["files"] if n.endswith(".tmp")], got["files"]


_RESUMED_ON_A_FULL_DISK = """
import json, os, subprocess, sys, time
fs, app = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "labctl-test-fs", fs], check=True)
d = os.path.join(fs, "app")
def call(*args):
    r = subprocess.run([sys.executable, "-S", "-I", app, *args, "--dir", d],
                       capture_output=True, text=True, check=False)
    return {"rc": r.returncode, "out": r.stdout, "err": r.stderr}
def until_full():
    for _ in range(200):
        status = json.loads(call("status")["out"])
        if status["full_since"] is not None:
            break
        time.sleep(0.05)
    return status
call("run", "--rate", "2MiB/s", "--background")
first = until_full()
stopped_first = json.loads(call("stop")["out"])
filled = None
with open(os.path.join(fs, "fill"), "wb", buffering=0) as f:
    try:
        while True:
            f.write(b"x" * 512)
    except OSError as e:
        filled = e.errno
resume = call("resume")
status = until_full()
stopped = json.loads(call("stop")["out"])
print(json.dumps({"first": first, "stopped_first": stopped_first, "filled": filled,
                  "resume": resume, "status": status, "stopped": stopped,
                  "verify": call("verify")["out"], "files": sorted(os.listdir(d))}))
"""


class _Here:
    """The destination VM's SSH session, faked by running its commands here: the
    application and its directory are real (``APP``, ``APP_DIR`` mapped to this file and a
    temporary directory)."""

    name = "web1"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def run(self, argv: list[str], check: bool = True,
                  timeout: float | None = None) -> Any:
        from labctl.core.proc import CommandResult
        from labctl.lab import replicate

        here = [sys.executable if a == "python3" else str(APP) if a == replicate.APP
                else a.replace(replicate.APP_DIR, str(self.directory)) for a in argv]
        ran = subprocess.run(here, capture_output=True, text=True, timeout=timeout or 60,
                             check=False)
        return CommandResult(here, ran.returncode, ran.stdout, ran.stderr)


def _first(directory: Path, after: int, **kw: float) -> Any:
    import asyncio

    from labctl.lab.replicate import _first_new_ack

    return asyncio.run(_first_new_ack(_Here(directory), after, **kw))  # type: ignore[arg-type]


def test_the_cutover_reads_the_destination_s_first_acknowledgement(tmp_path: Path) -> None:
    """A writer started on the destination: its first acknowledgement past the source's
    last, from its own log."""
    subprocess.run([sys.executable, "-S", "-I", str(APP), "run", "--dir", str(tmp_path),
                    "--rate", "1MiB/s", "--background"], capture_output=True, check=True,
                   timeout=20)
    try:
        after = _until_acked(tmp_path, 5)
        seq, at = _first(tmp_path, after)
        assert seq > after and abs(at - time.time()) < 30
    finally:
        app.stop(tmp_path)


def test_a_destination_writer_that_exited_is_said_at_once(tmp_path: Path) -> None:
    """A writer gone after its start is an error at once, with its log's last words (not
    a minute's wait for an acknowledgement that cannot come)."""
    from labctl.core.errors import LabError

    (tmp_path / "app.log").write_text("Traceback ...\nOSError: [Errno 5] Input/output error\n")
    with pytest.raises(LabError, match=r"exited after it started: .*Input/output error"):
        _first(tmp_path, 0)


def test_a_destination_whose_disk_is_full_has_no_outage_to_measure(tmp_path: Path) -> None:
    """A writer whose every batch its disk refuses (the replica of a full disk: the app's
    own behaviour there is the root test above): the cutover ends with why no outage was
    measured, once the disk has said so for ``full_for`` seconds."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    writer = subprocess.Popen([sys.executable, "-c", "import time; print('', flush=True); "
                               "time.sleep(60)", str(APP), "run"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "\n"
        app.write_pid(tmp_path, app.PidFile(writer.pid, boot, time.time() - 3))
        why = _first(tmp_path, 40, full_for=1.0)
        assert isinstance(why, str) and "every record (up to 40)" in why, why
        assert "its disk is full" in why, why
    finally:
        writer.kill()
        writer.wait()


def test_the_cutover_checks_every_record_up_to_the_source_s_last(tmp_path: Path) -> None:
    """After the outage the cutover checks records 1 to the source's last acknowledged
    one on the destination (against the real application, its SSH session faked): all
    there is the record's check; one damaged is data lost, said in one line."""
    import asyncio

    from labctl.core.errors import LabError
    from labctl.lab.replicate import _every_record

    last = app.run(tmp_path, 1 << 20, stop_after=0.3)
    stopped = {"last_acked": last, "acked_at": 1.0}
    got = asyncio.run(_every_record(_Here(tmp_path), stopped, {"checked_from": last}))  # type: ignore[arg-type]
    assert got["ok"] and got["records"] == last and got["last_acked"] == last, got
    assert got["started_on"] == {"checked_from": last} and got["seconds"] >= 0
    _flip(tmp_path, 2)
    with pytest.raises(LabError, match=r"records on the destination are not all there: "
                                       r"record 2: checksum mismatch \(the source's last "
                                       rf"acknowledged record is {last}\); it is stopped"):
        asyncio.run(_every_record(_Here(tmp_path), stopped, {}))  # type: ignore[arg-type]
