"""The replication agents as the guests run them (the file alone, ``python3 -S -I``), on
real files and a real mutual-TLS channel on this machine: pass 1 copies the data blocks,
a later pass exactly what changed, a source that lost its map asks the target's digests,
a cut pass resumes from its last flush, and a client without the lab's certificate gets
nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labctl.replication import agent, blocks
from labctl.state.pki import LabPki

AGENT = Path(agent.__file__)
SIZE = 8 << 20
B = blocks.BLOCK


def _tls(pki: LabPki, name: str, out: Path) -> Path:
    issued = pki.issue(name, ["127.0.0.1"], out / "issued")
    for src, dst in ((issued.cert, "cert.pem"), (issued.key, "key.pem"), (issued.ca, "ca.pem")):
        shutil.copyfile(src, out / dst)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    # the copy the guest gets: this file and blocks.py side by side, standard library only
    return subprocess.run([sys.executable, "-S", "-I", str(AGENT), *args], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, Path | str]]:
    pki = LabPki("t", tmp_path / "pki")
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for i in (0, 3, 4, 100, 127):  # five data blocks, the rest holes
            f.seek(i * B)
            f.write(os.urandom(B))
    with open(dst, "wb") as f:
        f.truncate(SIZE)
    port = _free_port()
    dstate = tmp_path / "dstate"
    res = _agent("target", "--disk", str(dst), "--listen", f"127.0.0.1:{port}", "--tls",
                 str(_tls(pki, "dst", tmp_path / "dtls")), "--state", str(dstate))
    assert res.returncode == 0, res.stderr
    try:
        yield {"src": src, "dst": dst, "to": f"127.0.0.1:{port}",
               "tls": _tls(pki, "src", tmp_path / "stls"), "state": tmp_path / "sstate",
               "tmp": tmp_path}
    finally:
        assert json.loads(_agent("stop", "--state", str(dstate)).stdout)["stopped"]


def _pass(p: dict[str, Path | str], *more: str) -> dict[str, object]:
    res = _agent("pass", "--disk", str(p["src"]), "--to", str(p["to"]), "--tls", str(p["tls"]),
                 "--state", str(p["state"]), *more)
    assert res.returncode == 0, res.stderr
    got: dict[str, object] = json.loads(res.stdout)
    return got


def _equal(p: dict[str, Path | str]) -> bool:
    res = _agent("verify", "--disk", str(p["src"]), "--to", str(p["to"]), "--tls", str(p["tls"]))
    return bool(json.loads(res.stdout)["equal"])


def _write(path: Path | str, block: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(block * B)
        f.write(data)


def test_pass_one_copies_the_data_then_each_pass_what_changed(pair: dict[str, Path | str]
                                                              ) -> None:
    assert not _equal(pair)
    first = _pass(pair, "--full")
    assert (first["how"], first["blocks"], first["bytes"]) == ("full", 5, 5 * B)
    assert _equal(pair) and Path(pair["dst"]).read_bytes() == Path(pair["src"]).read_bytes()
    _write(pair["src"], 3, os.urandom(B))
    _write(pair["src"], 50, b"x" * 100)  # into a hole: that block is new data
    second = _pass(pair, "--compress")
    assert (second["how"], second["blocks"], second["bytes"]) == ("map", 2, 2 * B)
    assert int(str(second["wire_bytes"])) < 2 * B  # the mostly-zero block compressed
    assert _equal(pair)
    assert _pass(pair)["blocks"] == 0  # nothing changed: nothing sent


def test_a_source_that_lost_its_map_asks_the_target(pair: dict[str, Path | str]) -> None:
    _pass(pair, "--full")
    shutil.rmtree(pair["state"])  # a reboot: the map lived on tmpfs
    _write(pair["src"], 127, os.urandom(B))
    got = _pass(pair)
    assert (got["how"], got["blocks"]) == ("rehash", 1)
    assert _equal(pair)


def test_a_pass_cut_short_resumes_from_its_last_flush(pair: dict[str, Path | str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The first pass dies at its second checkpoint (after the target's fsync, before the
    map is saved): the next pass sends only what the first checkpoint had not covered."""
    for i in range(5, 40):
        _write(pair["src"], i, os.urandom(B))  # 40 data blocks: 2.5 MiB
    monkeypatch.setattr(agent, "CHECKPOINT", 1 << 20)
    real_flush = agent._flush
    flushes = {"n": 0}

    def cut_after_first(sock: object) -> None:
        real_flush(sock)  # type: ignore[arg-type]
        flushes["n"] += 1
        if flushes["n"] == 2:
            raise agent.AgentError("the channel closed")

    monkeypatch.setattr(agent, "_flush", cut_after_first)
    with pytest.raises(agent.AgentError):
        agent.one_pass(Path(pair["src"]), str(pair["to"]), Path(pair["tls"]),
                       Path(pair["state"]), full=True, compress=False, limit=None)
    monkeypatch.setattr(agent, "_flush", real_flush)
    again = agent.one_pass(Path(pair["src"]), str(pair["to"]), Path(pair["tls"]),
                           Path(pair["state"]), full=False, compress=False, limit=None)
    assert (again["how"], again["blocks"]) == ("map", 40 - 16), again  # 1 MiB was saved
    assert _equal(pair)


def test_a_client_without_the_lab_s_certificate_gets_nothing(pair: dict[str, Path | str]
                                                             ) -> None:
    other = _tls(LabPki("other", Path(pair["tmp"]) / "otherpki"), "src",
                 Path(pair["tmp"]) / "othertls")
    res = _agent("pass", "--disk", str(pair["src"]), "--to", str(pair["to"]), "--tls",
                 str(other), "--state", str(Path(pair["tmp"]) / "ostate"), "--full")
    assert res.returncode == 2 and "agent:" in res.stderr, res
    assert not any(Path(pair["dst"]).read_bytes())  # not one block written


def test_a_target_of_another_size_is_refused(pair: dict[str, Path | str]) -> None:
    with open(pair["src"], "r+b") as f:
        f.truncate(SIZE + B)
    res = _agent("pass", "--disk", str(pair["src"]), "--to", str(pair["to"]), "--tls",
                 str(pair["tls"]), "--state", str(pair["state"]), "--full")
    assert res.returncode == 2 and "the target's disk has" in res.stderr, res.stderr


def test_a_source_cut_off_mid_pass_does_not_hold_the_target(pair: dict[str, Path | str]
                                                             ) -> None:
    """A cut WAN leaves the target a connection that never speaks again: the next pass's
    connection takes over at once, and the old one writes nothing more."""
    stale = agent._connect(str(pair["to"]), Path(pair["tls"]))
    agent._hello(stale, SIZE)  # then silence, as behind a cut link
    try:
        got = _pass(pair, "--full")
        assert (got["how"], got["blocks"]) == ("full", 5)
        assert _equal(pair)
        stale.settimeout(10)
        with pytest.raises((OSError, agent.AgentError)):
            stale.sendall(agent._FRAME.pack(agent.BLOCK, 0, B) + bytes(B))
            agent._flush(stale)  # no answer: the target let go of it
    finally:
        stale.close()
    assert _equal(pair)  # and the block it tried to write did not land


# -- era tracking: dm-era itself is faked (it needs a device-mapper map in a guest; the
# e2e tests run the real one), the agent's use of what it says is real ---------------------
class FakeEra:
    """What dm-era would say: the era each block was last written in (a checkpoint starts
    a new era), and the era the agent last committed."""

    eras: dict[int, int] = {}
    now = saved = 1
    tracking = False
    starts = 0

    def __init__(self, state: Path) -> None:
        self.state = state

    @classmethod
    def reset(cls) -> None:
        cls.eras, cls.now, cls.saved, cls.tracking, cls.starts = {}, 1, 1, False, 0

    @classmethod
    def write(cls, block: int) -> None:
        cls.eras[block] = cls.now

    @classmethod
    def dirty(cls) -> set[int]:
        """The blocks written since the committed era."""
        return {b for b, e in cls.eras.items() if e >= cls.saved}

    def active(self) -> bool:
        return FakeEra.tracking

    def start(self) -> dict[str, object]:  # fresh metadata: the eras count from 1 again
        FakeEra.tracking, FakeEra.eras, FakeEra.now, FakeEra.saved = True, {}, 1, 1
        FakeEra.starts += 1
        return {}

    def ident(self) -> str | None:
        return f"tracker-{FakeEra.starts}" if FakeEra.tracking else None

    def stop(self) -> bool:
        was, FakeEra.tracking = FakeEra.tracking, False
        return was

    def written(self, since: int | None = None) -> tuple[list[int], int]:
        frm = FakeEra.saved if since is None else since
        FakeEra.now += 1  # the checkpoint: later writes are in the new era
        return sorted(b for b, e in FakeEra.eras.items() if e >= frm), FakeEra.now

    def since(self) -> int:
        return FakeEra.saved

    def commit(self, since: int) -> None:
        FakeEra.saved = since


@pytest.fixture
def era(monkeypatch: pytest.MonkeyPatch) -> type[FakeEra]:
    FakeEra.reset()
    monkeypatch.setattr(agent, "Era", FakeEra)
    return FakeEra


def _era_pass(p: dict[str, Path | str], full: bool = False) -> dict[str, object]:
    return agent.one_pass(Path(p["src"]), str(p["to"]), Path(p["tls"]), Path(p["state"]),
                          full=full, compress=False, limit=None, tracking="era")


def _tracked_write(era: type[FakeEra], p: dict[str, Path | str], block: int) -> None:
    _write(p["src"], block, os.urandom(B))
    era.write(block)


def test_era_tracking_reads_only_what_the_tracker_says(pair: dict[str, Path | str],
                                                       era: type[FakeEra]) -> None:
    first = _era_pass(pair, full=True)
    assert first["how"] == "full" and era.tracking and era.starts == 1  # before the scan
    _tracked_write(era, pair, 3)
    _tracked_write(era, pair, 60)
    second = _era_pass(pair)
    assert (second["how"], second["blocks"]) == ("era", 2)
    assert second["read_bytes"] == second["bytes"] == 2 * B  # no scan of the disk
    assert _equal(pair)
    assert _era_pass(pair)["blocks"] == 0  # the era moved on: nothing new


def test_an_era_pass_cut_short_keeps_what_it_had_to_send(pair: dict[str, Path | str],
                                                         era: type[FakeEra],
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    _era_pass(pair, full=True)
    for i in range(10, 40):
        _tracked_write(era, pair, i)
    monkeypatch.setattr(agent, "CHECKPOINT", 1 << 20)
    real_flush = agent._flush
    flushes = {"n": 0}

    def cut(sock: object) -> None:  # the second flush: the target has it, the source not
        real_flush(sock)  # type: ignore[arg-type]
        flushes["n"] += 1
        if flushes["n"] == 2:
            raise agent.AgentError("the channel closed")

    monkeypatch.setattr(agent, "_flush", cut)
    with pytest.raises(agent.PassCut) as info:
        _era_pass(pair)
    assert info.value.progress == {"how": "era", "todo_blocks": 30, "carried_blocks": 0,
                                   "flushed_blocks": 16, "flushed_bytes": 16 * B}
    monkeypatch.setattr(agent, "_flush", real_flush)
    assert era.dirty() == set()  # the tracker moved on: the rest is the agent's to keep
    _tracked_write(era, pair, 100)
    again = _era_pass(pair)
    # 30 blocks to send, 16 (1 MiB) saved at the first flush: 14 left, and the new one
    assert (again["how"], again["blocks"], again["carried_blocks"]) == ("era", 14 + 1, 14)
    assert _equal(pair)


def test_a_lost_tracker_falls_back_to_a_hash_pass_and_tracks_again(
        pair: dict[str, Path | str], era: type[FakeEra]) -> None:
    _era_pass(pair, full=True)
    shutil.rmtree(pair["state"])  # a reboot: the map and the tracker are gone
    era.tracking = False
    _write(pair["src"], 127, os.urandom(B))  # written while nothing tracked
    got = _era_pass(pair)
    assert (got["how"], got["blocks"]) == ("rehash", 1) and era.tracking and era.starts == 2
    assert _equal(pair)


def test_dm_era_s_answer_is_read_as_blocks(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    """era_invalidate's XML as dm-era's tools print it (ranges end exclusive, with spaces
    around some '='); the era after the snapshot is what the next pass asks from."""
    calls: list[tuple[str, ...]] = []
    answers = {
        "status": "0 1048576 era 8 27/4096 5 93",
        "era_invalidate": '<blocks>\n  <block block="0"/>\n  <range begin="2972" end = "2976"/>'
                          '\n  <block block="4096"/>\n</blocks>\n',
    }

    def cmd(*argv: str) -> str:
        calls.append(argv)
        return answers.get(argv[1] if argv[0] == "dmsetup" else argv[0], "")

    monkeypatch.setattr(agent, "_cmd", cmd)
    e = agent.Era(tmp_path)
    e.file.write_text(json.dumps({"loop": "/dev/loop0", "origin": "259:1", "length": "8",
                                  "since": 3}))
    found, now = e.written()
    assert found == [0, 2972, 2973, 2974, 2975, 4096] and now == 5
    inv = next(c for c in calls if c[0] == "era_invalidate")
    assert inv[1:] == ("--written-since", "3", "--metadata-snapshot", "/dev/loop0")
    # the snapshot is taken before it is read and dropped after
    msgs = [c[4] for c in calls if c[:2] == ("dmsetup", "message")]
    assert msgs == ["checkpoint", "take_metadata_snap", "drop_metadata_snap"]
    e.commit(now)
    assert json.loads(e.file.read_text())["since"] == 5


def test_free_bytes_is_read_where_the_disk_is_mounted(tmp_path: Path) -> None:
    """The source agent reports the free space of the file system its disk holds: the mount
    point whose device is the disk's (whatever name the mount table gives it), its mount
    point unescaped as the kernel writes blanks."""
    point = tmp_path / "mnt here"
    point.mkdir()
    mounts = tmp_path / "mounts"
    escaped = str(point).replace(" ", "\\040")
    mounts.write_text(f"proc /proc proc rw 0 0\n/dev/root {escaped} ext4 rw 0 0\n")
    device = os.stat(point).st_dev
    st = os.statvfs(point)
    got = agent.free_bytes_of(device, mounts)
    # the file system under tmp_path is shared with the rest of the machine: its free space
    # moves a little between two reads, never by a whole disk's worth
    assert got is not None and abs(got - st.f_bavail * st.f_frsize) < 64 << 20
    # a device no mount point is on; a mount point listed but gone
    assert agent.free_bytes_of(device, _only(tmp_path, "proc /proc proc rw 0 0\n")) is None
    assert agent.free_bytes_of(device, _only(tmp_path, f"/dev/x {tmp_path}/gone ext4 rw 0 0\n")
                               ) is None


def _only(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "other-mounts"
    path.write_text(text)
    return path


def _forty_blocks(p: dict[str, Path | str]) -> None:
    for i in range(5, 40):
        _write(p["src"], i, os.urandom(B))


def test_a_pass_whose_time_runs_out_stops_flushed_and_the_next_sends_the_rest(
        pair: dict[str, Path | str]) -> None:
    """``--until``: the pass stops at the next block once its time is up, what it sent
    flushed to the target and mapped here; the next pass sends only the rest."""
    _forty_blocks(pair)
    res = _agent("pass", "--disk", str(pair["src"]), "--to", str(pair["to"]), "--tls",
                 str(pair["tls"]), "--state", str(pair["state"]), "--full",
                 "--limit", str(1 << 20), "--until", "0.6")  # 2.5 MiB at 1 MiB/s: 2.5 s
    assert res.returncode == 2 and "its time (0.6 s) ran out" in res.stderr, res
    cut = json.loads(res.stdout.splitlines()[-1])
    assert cut["deadline"] and cut["todo_blocks"] == 40, cut
    assert 0 < cut["flushed_blocks"] < 40 and cut["flushed_bytes"] == cut["flushed_blocks"] * B
    assert not (Path(pair["state"]) / "pass.pid").exists()
    rest = _pass(pair)
    assert (rest["how"], rest["blocks"]) == ("map", 40 - cut["flushed_blocks"]), rest
    assert _equal(pair)


def test_a_pass_its_caller_left_is_stopped_by_its_pid(pair: dict[str, Path | str]) -> None:
    """A pass whose caller went away (Ctrl-C) is found by its state directory and ended;
    a pid file naming another process ends nothing."""
    _forty_blocks(pair)
    state = Path(pair["state"])
    proc = subprocess.Popen([sys.executable, "-S", "-I", str(AGENT), "pass", "--disk",
                             str(pair["src"]), "--to", str(pair["to"]), "--tls",
                             str(pair["tls"]), "--state", str(state), "--full", "--limit",
                             str(256 << 10)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if (state / "pass.pid").exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        got = json.loads(_agent("stop", "--name", "pass", "--state", str(state)).stdout)
        assert got == {"stopped": True, "pid": proc.pid}, got
        assert proc.wait(10) == -15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (state / "pass.pid").write_text(f"{os.getpid()}\n")  # not an agent's pass: left alone
    assert json.loads(_agent("stop", "--name", "pass", "--state", str(state)).stdout) == {
        "stopped": False}



def test_a_precheck_its_caller_left_is_found_and_stopped(tmp_path: Path) -> None:
    """A precheck names itself in ``precheck.pid`` while it runs, so that one left running
    by a dropped session is stopped before the next pass: ``agent.py stop --name precheck``
    ends it. The comparison is held up here (a stand-in for a slow disk or WAN); the
    process, its command line and the stop are the agent's own."""
    guest = tmp_path / "guest"
    guest.mkdir()
    for f in ("agent.py", "blocks.py"):  # the copy a guest gets, side by side
        shutil.copy(AGENT.parent / f, guest / f)
    state = tmp_path / "state"
    state.mkdir()
    held = tmp_path / "held"
    hold = ("import runpy, sys, time; sys.argv = sys.argv[1:]; sys.path.insert(0, "
            f"{str(guest)!r}); import agent; "
            f"agent.precheck = lambda *a: (open({str(held)!r}, 'w').close(), time.sleep(60)); "
            "sys.exit(agent.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-S", "-I", "-c", hold, str(guest / "agent.py"),
                             "precheck", "--disk", str(tmp_path / "disk"), "--to",
                             "127.0.0.1:1", "--tls", str(tmp_path), "--state", str(state)])
    try:
        for _ in range(300):
            if held.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert held.exists(), proc.poll()
        assert (state / "precheck.pid").read_text().split() == [str(proc.pid)]
        assert agent.running(state, "precheck") == proc.pid
        assert agent.running(state, "pass") is None  # no pass.pid: not a pass
        got = json.loads(_agent("stop", "--name", "precheck", "--state", str(state)).stdout)
        assert got == {"stopped": True, "pid": proc.pid}
        assert proc.wait(timeout=20) == -15  # SIGTERM
        assert not (state / "precheck.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_only_the_agent_running_that_command_is_that_command(tmp_path: Path) -> None:
    """A pid file is trusted only when its process runs the agent with that command: one
    running ``agent.py stop --name pass`` holds the word but is no pass, nor is a program
    whose name merely ends in agent.py."""
    state = tmp_path / "state"
    state.mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = {argv[0]: subprocess.Popen([*sleeper, *argv[1:]]) for argv in (
        ["stop", str(tmp_path / "agent.py"), "stop", "--name", "pass"],
        ["other", str(tmp_path / "myagent.py"), "pass"],
        ["pass", str(tmp_path / "agent.py"), "pass", "--disk", "/dev/vdb"])}
    try:
        for which in ("stop", "other"):
            (state / "pass.pid").write_text(f"{procs[which].pid}\n")
            assert agent.running(state, "pass") is None, which
        got = json.loads(_agent("stop", "--name", "pass", "--state", str(state)).stdout)
        assert got == {"stopped": False} and procs["other"].poll() is None
        (state / "pass.pid").write_text(f"{procs['pass'].pid}\n")
        assert agent.running(state, "pass") == procs["pass"].pid
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_a_silent_channel_fails_the_pass_after_its_stall_time(tmp_path: Path,
                                                              pair: dict[str, Path | str]
                                                              ) -> None:
    """``--stall``: a peer that accepts and then says nothing (a WAN cut after the
    connection) fails the pass after that many seconds, not after the default 30."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        res = _agent("pass", "--disk", str(pair["src"]), "--to", f"127.0.0.1:{port}",
                     "--tls", str(pair["tls"]), "--state", str(tmp_path / "s"), "--full",
                     "--stall", "1")
    assert res.returncode == 2 and "timed out" in res.stderr, res
    assert time.monotonic() - t0 < 20  # the default stall (30 s) would still be waiting
    # it failed before it knew what it was: it began nothing (no new write tracker)
    said = json.loads(res.stdout.strip().splitlines()[-1])
    assert said["how"] is None and said["todo_blocks"] == 0, said


# -- the tracked verification: a precheck of both disks whole before the freeze, then only
# what was written since --------------------------------------------------------------------
def test_a_tracked_verification_reads_only_what_was_written_since_the_precheck(
        pair: dict[str, Path | str], era: type[FakeEra]) -> None:
    src, to, tls, state = Path(pair["src"]), str(pair["to"]), Path(pair["tls"]), \
        Path(pair["state"])
    _era_pass(pair, full=True)
    _tracked_write(era, pair, 3)
    _era_pass(pair)
    _tracked_write(era, pair, 60)  # after the last pass: it differs, as the tracker says
    found = agent.precheck(src, to, tls, state)
    assert (found["blocks"], found["differ_count"], found["unexplained_count"]) == (128, 1, 0)
    assert found["to_send"] == 1  # what the final pass sends, were it frozen now
    assert json.loads((state / "precheck.json").read_text()) == found
    _tracked_write(era, pair, 61)  # after the precheck, before the freeze
    final = _era_pass(pair)
    assert (final["how"], final["blocks"], final["era_since"]) == ("era", 2, found["since"])
    todo = agent._indexes(state / "last-todo")
    assert todo == [60, 61]
    assert agent.verify(src, to, tls, todo) == {"mode": "tracked", "blocks": 2, "equal": True,
                                                "differ": [], "differ_count": 0}
    _write(pair["dst"], 61, os.urandom(B))  # a block the target got wrong: said
    assert agent.verify(src, to, tls, todo)["differ"] == [61]


def test_a_tracked_verification_after_more_passes_reads_all_since_the_precheck(
        pair: dict[str, Path | str], era: type[FakeEra],
        capsys: pytest.CaptureFixture[str]) -> None:
    """When the criterion sent the replication back to passes after the precheck, the
    final pass's blocks are not all that may differ: a pass in between sent others. The
    verification reads every block written since the precheck's era (and what a cut pass
    had left then), so a block that pass left wrong on the target is found."""
    src, to, tls, state = Path(pair["src"]), str(pair["to"]), Path(pair["tls"]), \
        Path(pair["state"])
    _era_pass(pair, full=True)
    _tracked_write(era, pair, 3)
    _era_pass(pair)
    _tracked_write(era, pair, 60)
    found = agent.precheck(src, to, tls, state)
    assert found["unexplained_count"] == 0
    _tracked_write(era, pair, 61)  # during the precheck's aftermath
    between = _era_pass(pair)  # the criterion said: a pass again
    assert (between["how"], between["blocks"]) == ("era", 2)
    _write(pair["dst"], 61, os.urandom(B))  # the target got one of them wrong
    _tracked_write(era, pair, 62)
    final = _era_pass(pair)
    assert (final["how"], final["blocks"]) == ("era", 1) and final["era_since"] != found["since"]
    assert agent._indexes(state / "last-todo") == [62]  # the final pass alone misses 61
    tracker = str(found["tracker"])
    assert agent.since_precheck(state, int(found["since"]), tracker) == [60, 61, 62]
    # without the tracker it names, a tracked check is refused (its eras mean nothing)
    assert agent.main(["verify", "--disk", str(src), "--to", to, "--tls", str(tls),
                       "--since-precheck", str(found["since"]), "--state", str(state)]) == 2
    assert "--since-precheck needs --state and --tracker" in capsys.readouterr().err
    assert agent.main(["verify", "--disk", str(src), "--to", to, "--tls", str(tls),
                       "--since-precheck", str(found["since"]), "--state", str(state),
                       "--tracker", tracker]) == 1
    said = json.loads(capsys.readouterr().out)
    assert (said["mode"], said["blocks"], said["differ"]) == ("tracked", 3, [61]), said
    assert found["tracker"] == final["tracker"] == "tracker-1"
    # another tracker began since (its eras count from the start again): refused
    era.tracking = False
    assert _era_pass(pair)["how"] == "map" and era.starts == 2  # a new tracker
    with pytest.raises(agent.AgentError, match="is not the precheck's"):
        agent.since_precheck(state, int(found["since"]), str(found["tracker"]))
    era.tracking = False  # a reboot since: no tracker at all
    with pytest.raises(agent.AgentError, match="the write tracker is not running"):
        agent.since_precheck(state, int(found["since"]), tracker)


def test_a_write_the_tracker_missed_is_found_by_the_precheck(pair: dict[str, Path | str],
                                                             era: type[FakeEra]) -> None:
    src, to, tls, state = Path(pair["src"]), str(pair["to"]), Path(pair["tls"]), \
        Path(pair["state"])
    _era_pass(pair, full=True)
    _tracked_write(era, pair, 3)
    _write(pair["src"], 100, os.urandom(B))  # the tracker never heard of it
    found = agent.precheck(src, to, tls, state)
    assert (found["differ_count"], found["unexplained"]) == (2, [100]), found
    assert not agent.verify(src, to, tls)["equal"]  # the whole-disk check sees it too


def test_a_precheck_without_a_tracker_is_refused(pair: dict[str, Path | str]) -> None:
    _pass(pair, "--full")
    res = _agent("precheck", "--disk", str(pair["src"]), "--to", str(pair["to"]), "--tls",
                 str(pair["tls"]), "--state", str(pair["state"]))
    assert res.returncode == 2 and "the write tracker is not running" in res.stderr, res
    # its pid file goes with it (one that runs is found and stopped: the next test)
    assert not (Path(pair["state"]) / "precheck.pid").exists()
    (Path(pair["state"]) / "precheck.pid").write_text(f"{os.getpid()}\n")  # not an agent's
    got = _agent("stop", "--name", "precheck", "--state", str(pair["state"]))
    assert json.loads(got.stdout) == {"stopped": False}, got
