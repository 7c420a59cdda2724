"""The text a QEMU engineer reads after labctl migrate: key: value lines, one unit per kind,
no Python reprs, estimates labelled."""

from __future__ import annotations

import pytest

from labctl.migration.protocol import PassRecord
from labctl.migration.report import pass_line, print_result


def _pass(**kw: object) -> PassRecord:
    base: dict[str, object] = dict(pass_=3, t_rel=0.5, status="active",
                                   dirty_sync_count=3, transferred=200 << 20,
                                   remaining=10 << 20, total=256 << 20, dirty_pages_rate=0.0,
                                   dirty_rate_bytes=0.0, expected_downtime_ms=None,
                                   throttle_pct=0, mbps=1000.0)
    base.update(kw)
    return PassRecord(**base)  # type: ignore[arg-type]


def test_pass_line_units_and_unknowns() -> None:
    line = pass_line(_pass())
    assert "None" not in line and "expected downtime - ms" in line
    assert "MB/s" not in line
    line = pass_line(_pass(dirty_rate_bytes=float(10 << 20), expected_downtime_ms=12))
    assert "dirty   10.0 MiB/s (QEMU)" in line and "expected downtime 12 ms" in line
    est = pass_line(_pass(dirty_rate_est_bytes=float(5 << 20)))
    assert "(estimate)" in est


def test_result_is_a_key_value_block(capsys: pytest.CaptureFixture[str]) -> None:
    print_result({
        "id": 3, "vm": "vm1", "source": "h1", "dest": "h2", "state": "cancelled",
        "policy": "strict", "storage": "early", "error": "did not converge",
        "recovery": {"source": {"status": "running", "heartbeat_before": 10,
                                "heartbeat_after": 14, "alive": True},
                     "dest": {"name": "vm1", "removed": True}}})
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "migration 3: vm1 h1 -> h2: cancelled"
    assert "  recovery:               the VM runs on h1 again (heartbeat 10 -> 14); h2: " \
           "incoming VM dropped" in out
    assert "True" not in out and "{" not in out
