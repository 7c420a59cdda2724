"""The timeline picture of a migration record: what it draws and where, read from the
matplotlib objects (not the pixels). No VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from labctl.core.errors import LabError
from labctl.core.wire import Json
from labctl.migration import timeline
from labctl.migration.result import Record

pytest.importorskip("matplotlib")

MIB = 1 << 20


def _pass(n: int, t: float, sent_mib: float, remaining_mib: float,
          rate: float = 0.0) -> dict[str, Json]:
    """Pass ``n`` as stored: ``rate`` is QEMU's dirty-pages-rate in bytes/s (0: none)."""
    return {"pass": n, "t": t, "t_rel": t, "status": "active", "dirty_sync_count": n,
            "transferred": int(sent_mib * MIB), "remaining": int(remaining_mib * MIB),
            "total": 1024 * MIB, "dirty_pages_rate": rate / 4096, "dirty_rate_bytes": rate,
            "expected_downtime_ms": 0, "throttle_pct": 0, "mbps": None}


def _idle() -> Record:
    """An idle guest: two passes, QEMU saw no dirtying, STOP to first beat in 0.21 s."""
    return {"id": 1, "vm": "vm1", "source": "a", "dest": "b", "policy": "default",
            "storage": "early", "t0": 100.0, "stop_t": 100.63, "resume_t": 100.70,
            "total_ms": 690, "downtime_ms": 45, "blackout_ms": 210.0, "passes": 2,
            "bytes_sent": 72 * MIB, "mbps": 870.0, "stop_to_resume_ms": 70.0,
            "pass_records": [_pass(1, 100.02, 0, 1024), _pass(2, 100.62, 70, 1.5)],
            "dirty_rate_measured": {"dirty_rate_mib_s": 0},
            "heartbeat": {"source_last": {"t": 100.58}, "dest_first": {"t": 100.79}},
            "switchover": {"period_ms": 100, "stop_to_resume_ms": 70.0,
                           "hb_before_stop_ms": 50.0, "after_resume_ms": 90.0,
                           "checkpoints_ms": {"src-iterable-saved": 30.0,
                                              "src-non-iterable-saved": 45.0,
                                              "src-downtime-end": 45.0,
                                              "dst-precopy-loadvm-completed": 66.0}},
            "decisions": []}


def test_plot_refuses_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir"
    with pytest.raises(LabError, match=str(missing)):
        timeline.plot(_idle(), missing / "x.png")
    assert not missing.exists() and not missing.parent.exists()
    out = timeline.plot(_idle(), tmp_path / "x.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
