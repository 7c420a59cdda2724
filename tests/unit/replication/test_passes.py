"""What a pass's numbers say to the switchover criterion (the orchestrator's arithmetic,
without guests): the dirty rate is what the pass found changed since the previous one
began, the remaining delta what that rate changed during this pass, and the next pass's
prediction the digest scan plus that delta at the link's rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from labctl.core.proc import process_identity
from labctl.lab.replicate import _after_precheck, _final_predicted, _new_tracker_maybe, _view, gone
from labctl.replication.switchover import parse


def _got(sent: int, wire: int, send_s: float, digest_s: float) -> dict[str, object]:
    return {"how": "map", "blocks": sent // 65536, "bytes": sent, "wire_bytes": wire,
            "read_bytes": 512 << 20, "cpu_seconds": 1.0, "digest_seconds": digest_s,
            "send_seconds": send_s}


def test_pass_one_found_everything_and_predicts_the_scan() -> None:
    view, rec = _view(1, _got(200 << 20, 100 << 20, 10.0, 8.0), took=18.0, t_start=100.0,
                      prev_start=None, t_begin=100.0, w_start=1.7e9)
    assert view.dirty_rate == 0.0 and view.remaining == 0.0
    # the disk's bytes per second: compressed to half on the wire, the delta still counts
    # in the disk's bytes
    assert view.link_rate == pytest.approx((200 << 20) / 10.0)
    assert view.predicted_outage == pytest.approx(8.0)  # the final pass still scans
    assert rec.predicted_next_s == pytest.approx(8.0)


def test_a_later_pass_measures_the_dirty_rate_and_predicts() -> None:
    # 4 MiB found changed since the previous pass began 20 s before this one
    view, rec = _view(2, _got(4 << 20, 4 << 20, 0.5, 8.0), took=9.0, t_start=120.0,
                      prev_start=100.0, t_begin=100.0, w_start=1.7e9)
    assert view.dirty_rate == pytest.approx((4 << 20) / 20.0)
    assert view.remaining == pytest.approx((4 << 20) / 20.0 * 9.0)
    rate = (4 << 20) / 0.5
    assert view.predicted_outage == pytest.approx(8.0 + view.remaining / rate)
    assert parse("predicted_outage <= 10s and passes >= 2").over(view).holds
    assert not parse("predicted_outage <= 8s").over(view).holds
    assert rec.remaining == round(view.remaining)


def test_a_pass_that_moved_nothing_predicts_the_scan_alone() -> None:
    """An idle guest: nothing changed, nothing to send; the final pass is its scan (the
    link's rate is the last one known)."""
    view, record = _view(3, _got(0, 0, 0.0, 8.0), took=8.0, t_start=140.0, prev_start=120.0,
                      t_begin=100.0, w_start=1.7e9, prev_link_rate=5e6)
    assert view.remaining == 0.0 and view.link_rate == 5e6
    assert view.predicted_outage == pytest.approx(8.0)
    assert record.predicted_next_s == pytest.approx(8.0)
    assert parse("predicted_outage <= 10s and passes >= 2").over(view).holds


def test_with_era_tracking_the_next_pass_does_not_scan() -> None:
    """dm-era says what changed: after the full pass (or a rehash) the next pass's cost is
    the delta alone, after an era pass the tracker's answer time plus the delta."""
    full = {**_got(200 << 20, 200 << 20, 10.0, 8.0), "how": "full"}
    view, _ = _view(1, full, took=18.0, t_start=100.0, prev_start=None, t_begin=100.0,
                    w_start=1.7e9, tracking="era")
    assert view.predicted_outage == 0.0  # nothing changed yet to send, nothing to scan
    era = {**_got(4 << 20, 4 << 20, 0.5, 0.2), "how": "era"}
    view, _ = _view(2, era, took=1.0, t_start=120.0, prev_start=100.0, t_begin=100.0,
                    w_start=1.7e9, tracking="era")
    assert view.predicted_outage == pytest.approx(0.2 + view.remaining / ((4 << 20) / 0.5))


def test_the_next_pass_pays_this_one_s_fixed_cost_again() -> None:
    """An era pass of 0.7 s that took the controller 1.9 s: 1.2 s went to the command's
    round trip and the agent's start, which the final pass pays too (left out, the
    prediction was half of the final pass's 2.5 s)."""
    era = {**_got(4 << 20, 4 << 20, 0.5, 0.2), "how": "era"}
    view, rec = _view(2, era, took=2.1, t_start=120.0, prev_start=100.0, t_begin=100.0,
                      w_start=1.7e9, tracking="era", call_s=1.9)
    delta = view.remaining / ((4 << 20) / 0.5)
    assert rec.fixed_seconds == pytest.approx(1.2)
    assert view.predicted_outage == pytest.approx(0.2 + 1.2 + delta)
    assert rec.predicted_next_s == pytest.approx(0.2 + 1.2 + delta, abs=1e-3)
    # a command no longer than its scan and send (clock granularity) adds nothing
    view, rec = _view(2, era, took=0.6, t_start=120.0, prev_start=100.0, t_begin=100.0,
                      w_start=1.7e9, tracking="era", call_s=0.6)
    delta = view.remaining / ((4 << 20) / 0.5)
    assert rec.fixed_seconds == 0.0 and view.predicted_outage == pytest.approx(0.2 + delta)



def test_after_a_comparison_before_the_freeze_the_final_pass_is_predicted_again() -> None:
    """The criterion's prediction is the last pass's; a tracked verification's comparison
    of both disks (70 s for 2 GiB) comes between, and what was written meanwhile is the
    final pass's to send: the tracker's count of it, at the last pass's rate, plus its
    fixed cost. Without that comparison the criterion's prediction stands."""
    era = {**_got(4 << 20, 4 << 20, 0.5, 0.2), "how": "era"}
    _, last = _view(2, era, took=2.1, t_start=120.0, prev_start=100.0, t_begin=100.0,
                    w_start=1.7e9, tracking="era", call_s=1.9)
    assert _final_predicted(last, None) == last.predicted_next_s
    assert _final_predicted(last, {"since": 3}) == last.predicted_next_s  # an older agent
    # 40 blocks of 64 KiB at 8 MiB/s: 0.3125 s, the fixed 1.2 s, and the tracker's answer
    # at what it cost the last pass a block (0.2 s for its 64)
    assert _final_predicted(last, {"to_send": 40}) == pytest.approx(
        1.2 + 0.2 * 40 / 64 + 0.3125, abs=1e-3)
    # after a pass that began its tracker (a map pass), the tracker's cost is not known
    _, mapped = _view(2, _got(4 << 20, 4 << 20, 0.5, 0.2), took=2.1, t_start=120.0,
                      prev_start=100.0, t_begin=100.0, w_start=1.7e9, tracking="era",
                      call_s=1.9)
    assert _final_predicted(mapped, {"to_send": 40}) == pytest.approx(1.2 + 0.3125, abs=1e-3)


def test_the_criterion_is_asked_again_with_what_the_comparison_left_to_send() -> None:
    """A criterion that held at the last pass can fail once the comparison before the
    freeze is done: the application wrote meanwhile. The view the criterion is asked
    again has that count as the remaining delta and the final pass predicted from it; its
    record (``precheck``) sends nothing, reads the disk whole, and says how long the
    comparison took."""
    era = {**_got(4 << 20, 4 << 20, 0.5, 0.2), "how": "era"}
    view, last = _view(3, era, took=2.1, t_start=120.0, prev_start=100.0, t_begin=100.0,
                       w_start=1.7e9, tracking="era", call_s=1.9)
    when = parse("predicted_outage <= 3s and remaining <= 16MiB and passes >= 2")
    assert when.over(view).holds
    pre = {"since": 7, "blocks": 8192, "to_send": 512, "seconds": 22.5}  # 32 MiB written
    seen, rec = _after_precheck(view, last, pre, 4, 1.7e9 + 30, 23.0, 0.0, 1.7e9)
    assert seen.remaining == 512 * 65536 and seen.passes == 3
    assert seen.predicted_outage == pytest.approx(
        1.2 + 0.2 * 512 / 64 + (32 << 20) / ((4 << 20) / 0.5))
    assert seen.predicted_outage == rec.predicted_next_s == _final_predicted(last, pre)
    assert not when.over(seen).holds  # a pass again
    assert (rec.n, rec.how, rec.bytes, rec.blocks, rec.todo_blocks) == (4, "precheck", 0, 0, 512)
    assert rec.read_bytes == 8192 * 65536 and rec.seconds == 23.0
    assert rec.digest_seconds == 22.5 and rec.link_rate == last.link_rate
    # little written meanwhile: it still holds
    seen, _ = _after_precheck(view, last, {**pre, "to_send": 2}, 4, 1.7e9, 23.0, 0.0, 1.7e9)
    assert when.over(seen).holds


def test_a_replication_s_timeline_is_drawn(tmp_path: Path) -> None:
    """``replication show ID --plot``: passes, rates, RPO and the outage in one picture;
    a directory that does not exist is a one-line refusal."""
    from labctl.core.errors import LabError
    from labctl.replication import timeline

    def one(n: int, how: str, at: float, sent: int) -> dict[str, object]:
        return {"n": n, "how": how, "started_at": at, "seconds": 20.0, "bytes": sent,
                "wire_bytes": sent, "dirty_rate": 3e5, "link_rate": 5e6, "rpo_s": 20.0,
                "decision": "continue", "error": None}

    rec = {"id": 1, "vm": "web1", "from_site": "a", "to_site": "b", "state": "completed",
           "switchover": "passes >= 2", "started_at": 1000.0,
           "passes": [one(1, "full", 1000.0, 200 << 20), one(2, "failed", 1020.0, 0),
                      one(3, "map", 1040.0, 30 << 20), one(4, "final", 1060.0, 20 << 20)],
           "cutover": {"source_acked_at": 1059.0, "dest_first_acked_at": 1110.0,
                       "outage_s": 51.0}}
    out = timeline.plot(rec, tmp_path / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LabError, match="does not exist"):
        timeline.plot(rec, tmp_path / "nowhere" / "t.png")


def test_the_destination_check_is_the_one_its_application_started_on() -> None:
    """The cutover reads the destination's records once: the check ``app.py resume``
    printed before it started, or the one its refusal said."""
    from labctl.core.proc import CommandResult
    from labctl.lab.replicate import _started_check

    check = {"records": 40, "last_acked": 40, "acked_at": 1.5, "first_bad": None, "ok": True}
    started = CommandResult(["app.py"], 0, json.dumps({"pid": 77, "verified": check}) + "\n",
                            "")
    assert _started_check(started) == check
    refused = CommandResult(["app.py"], 1, "", "app: /srv/app: acknowledged data is missing: "
                            '{"records": 3, "last_acked": 40, "ok": false}\n')
    assert _started_check(refused) == {"records": 3, "last_acked": 40, "ok": False}
    odd = CommandResult(["app.py"], 1, "", "python3: can't open file\n")
    assert _started_check(odd) == {"ok": False, "error": "python3: can't open file"}


def test_a_guest_program_s_answer_is_its_last_line_s_object() -> None:
    """What the agent and the application print last is their answer; output cut short or
    garbled is no answer (the caller raises one line with it, not a traceback)."""
    from labctl.core.proc import CommandResult
    from labctl.lab.replicate import _last_json, _started_check

    assert _last_json('working\n{"passes": 2}\n') == {"passes": 2}
    for text in ("", "\n", '{"passes": 2', "[1, 2]", "Traceback (most recent call last):"):
        assert _last_json(text) is None
    # started (exit 0) but its answer cut short: not a check that holds
    cut = CommandResult(["app.py"], 0, '{"pid": 77, "verif', "")
    assert _started_check(cut) == {"ok": False, "error": '{"pid": 77, "verif'}


def test_a_ctrl_c_past_the_point_of_no_return_lets_the_cutover_finish() -> None:
    """Once the source is stopping, the first Ctrl-C (the main task cancelled) is said and
    the cutover's steps run to their end; a second one abandons them."""
    import asyncio
    from types import SimpleNamespace

    from labctl.lab.replicate import _past_no_return

    said: list[str] = []
    whole: Any = SimpleNamespace(progress=said.append)
    ran: list[str] = []

    async def steps() -> Any:
        ran.append("stopping the source")
        await asyncio.sleep(0.3)
        ran.append("the destination booted")
        return "switched", None

    async def once() -> Any:
        outer = asyncio.ensure_future(_past_no_return(whole, "web1", steps()))
        await asyncio.sleep(0.05)
        outer.cancel()  # Ctrl-C
        return await outer

    assert asyncio.run(once()) == ("switched", None)
    assert ran == ["stopping the source", "the destination booted"]
    assert len(said) == 1 and said[0].startswith("web1: Ctrl-C with the source stopped"), said

    async def twice() -> Any:
        outer = asyncio.ensure_future(_past_no_return(whole, "web1", steps()))
        await asyncio.sleep(0.05)
        outer.cancel()
        await asyncio.sleep(0.05)
        outer.cancel()  # Ctrl-C again: abandoned, its steps cancelled with it
        return await outer

    ran.clear()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(twice())
    assert ran == ["stopping the source"]


def test_a_record_whose_labctl_is_gone_reads_as_failed() -> None:
    me = process_identity(os.getpid())
    assert me is not None and me.startswith(f"{os.getpid()}:")
    assert gone("running", me) is None  # its labctl is this process, alive
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    pid = int(child.stdout)
    dead = f"{pid}:1"  # the child has exited; a PID given again has another start
    why = gone("running", dead)
    assert why is not None and f"pid {pid}" in why and "ended without recording an end" in why
    # the same PID with another start time is another process: still gone
    assert gone("running", f"{os.getpid()}:0") is not None
    assert gone("completed", dead) is None and gone("running", None) is None


def test_which_failed_attempts_may_have_begun_a_new_tracker() -> None:
    """A comparison before the freeze holds for the tracker it read: a failed full, map or
    rehash pass may have begun another (it stops the old one before it sends), a cut era
    pass or one that failed at its connection did not, and one that said nothing is not
    known."""
    from labctl.lab.replicate import ReplicationError

    def failed(**evidence: object) -> ReplicationError:
        return ReplicationError("web1: agent: it failed", **evidence)

    assert not _new_tracker_maybe(failed(progress={"how": "era", "todo_blocks": 3}))
    assert not _new_tracker_maybe(failed(progress={"how": None, "todo_blocks": 0}))
    for how in ("full", "map", "rehash"):
        assert _new_tracker_maybe(failed(progress={"how": how}))
    assert _new_tracker_maybe(failed(progress={}))  # a check, or a session gone
    assert _new_tracker_maybe(failed())


def test_what_a_pass_surely_carries_is_the_application_s_last_ack() -> None:
    """Read before each pass: the source application's last acknowledged record and its
    time, from its own status; nothing when it has acknowledged none or cannot say (the
    pass goes on, its RPO then counted from its start)."""
    import asyncio

    from labctl.core.proc import CommandResult
    from labctl.drivers.ssh import SshError
    from labctl.lab.replicate import APP, APP_DIR, _acked

    class Machine:
        name = "web1"

        def __init__(self, code: int, out: str, fail: bool = False) -> None:
            self.code, self.out, self.fail = code, out, fail
            self.argv: list[str] = []

        async def run(self, argv: list[str], check: bool = True,
                      timeout: float = 120.0) -> CommandResult:
            self.argv = argv
            if self.fail:
                raise SshError("no SSH session with web1", machine="web1")
            return CommandResult(argv, self.code, self.out, "")

    said = json.dumps({"last_acked": 4711, "acked_at": 1796352638.25, "writer": 88})
    m = Machine(0, said + "\n")
    assert asyncio.run(_acked(m)) == (4711, 1796352638.25)  # type: ignore[arg-type]
    assert m.argv == ["python3", "-B", APP, "status", "--dir", APP_DIR]
    for machine in (Machine(0, json.dumps({"last_acked": 0, "acked_at": 0.0})),
                    Machine(1, "python3: can't open file"), Machine(0, "{garbled"),
                    Machine(0, json.dumps({"last_acked": "x", "acked_at": 1.0})),
                    Machine(0, said, fail=True)):
        assert asyncio.run(_acked(machine)) is None  # type: ignore[arg-type]
