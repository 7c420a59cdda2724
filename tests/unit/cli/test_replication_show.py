"""``labctl replication show ID`` as text: one line per pass, a failed attempt and the
criterion asked again after the comparison before the freeze each said in their own words."""

from __future__ import annotations

from typing import Any

import pytest

from labctl.cli.replication import _print


def _pass(n: int, how: str, **extra: Any) -> dict[str, Any]:
    return {"n": n, "how": how, "blocks": 40, "bytes": 40 << 16, "seconds": 2.5,
            "dirty_rate": 1 << 18, "link_rate": 8 << 20, "predicted_next_s": 1.4,
            "decision": "switch", "why": "passes >= 2: 2 vs 2: yes", "error": None,
            "todo_blocks": 40, **extra}


def test_each_kind_of_entry_reads_as_what_it_was(capsys: pytest.CaptureFixture[str]) -> None:
    rec = {"id": 3, "vm": "web1", "from_site": "cloud-a", "to_site": "cloud-b",
           "state": "running", "seconds": 80.0, "tracking": "era", "switchover": "x",
           "passes": [
               _pass(1, "full"),
               _pass(2, "failed", error="the channel closed"),
               _pass(3, "precheck", seconds=22.8, blocks=0, bytes=0, todo_blocks=512,
                     predicted_next_s=5.2, decision="continue",
                     why="after the comparison before the freeze: remaining <= 8MiB: "
                         "32.0 MiB vs 8.0 MiB: no")]}
    _print(rec)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  pass #1   full       40 blocks")
    assert lines[2] == "  pass #2   failed after 2.5 s: the channel closed"
    assert lines[3] == ("  check #3  both disks compared in 22.8 s: 512 blocks to send, next "
                        "5.2 s  continue: after the comparison before the freeze: remaining "
                        "<= 8MiB: 32.0 MiB vs 8.0 MiB: no")


def test_a_cutover_without_an_outage_to_measure_says_why(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The replica of a full disk: the application started on it and acknowledged nothing,
    so the outage line says why there is none instead of a figure."""
    why = ("the application started on the destination with every record (up to 40), but "
           "its disk is full: it has acknowledged none since (every batch refused for 6 s)")
    cut = {"final_s": 1.5, "final_predicted_s": 1.2, "final_prediction_error": 0.2,
           "verify": {"equal": True}, "steps": {"quiesce": 0.9}, "outage_s": None,
           "outage_unmeasured": why}
    rec = {"id": 4, "vm": "web1", "from_site": "cloud-a", "to_site": "cloud-b",
           "state": "completed", "seconds": 90.0, "tracking": "era", "switchover": "x",
           "passes": [_pass(1, "full")], "cutover": cut}
    _print(rec)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"  outage   not measured: {why}"
    _print({**rec, "cutover": {**cut, "outage_s": 12.5, "outage_unmeasured": None,
                               "source_last_acked": 40, "dest_first_acked": 41}})
    assert capsys.readouterr().out.splitlines()[-1] == (
        "  outage   12.50 s: record 40 acknowledged on the source, 41 the first on the "
        "destination")
