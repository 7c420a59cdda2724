"""The timeline picture of a migration record: what it draws and where, read from the
matplotlib objects (not the pixels). No VM."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

from labctl.core.errors import LabError
from labctl.core.wire import Json
from labctl.migration import timeline
from labctl.migration.result import Record

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.text import Text

pytest.importorskip("matplotlib")

MIB = 1 << 20


#: the tests' clock reads 100.0 when migrate is sent (a record's times are since then)
T0 = 100.0


def _pass(n: int, t: float, sent_mib: float, remaining_mib: float,
          rate: float = 0.0) -> dict[str, Json]:
    """Pass ``n`` as stored: ``rate`` is QEMU's dirty-pages-rate in bytes/s (0: none)."""
    return {"pass": n, "t_rel": round(t - T0, 6), "status": "active", "dirty_sync_count": n,
            "transferred": int(sent_mib * MIB), "remaining": int(remaining_mib * MIB),
            "total": 1024 * MIB, "dirty_pages_rate": rate / 4096, "dirty_rate_bytes": rate,
            "expected_downtime_ms": 0, "throttle_pct": 0, "mbps": None}


def _idle() -> Record:
    """An idle guest: two passes, QEMU saw no dirtying, STOP to first beat in 0.21 s."""
    return {"id": 1, "vm": "vm1", "source": "a", "dest": "b", "policy": "default",
            "storage": "early", "stop_t_rel": 0.63, "resume_t_rel": 0.70,
            "total_ms": 690, "downtime_ms": 45, "blackout_ms": 210.0, "passes": 2,
            "bytes_sent": 72 * MIB, "mbps": 870.0, "stop_to_resume_ms": 70.0,
            "pass_records": [_pass(1, 100.02, 0, 1024), _pass(2, 100.62, 70, 1.5)],
            "dirty_rate_measured": {"dirty_rate_mib_s": 0},
            "heartbeat": {"source_last": {"t_rel": 0.58}, "dest_first": {"t_rel": 0.79}},
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


def test_plot_where_no_picture_can_be_written(tmp_path: Path) -> None:
    """--plot naming a directory, a place under /proc, a format matplotlib does not write:
    IsADirectoryError, FileNotFoundError, ValueError; one line each now."""
    (tmp_path / "d.png").mkdir()
    for path, problem in ((tmp_path / "d.png", "Is a directory"),
                          (Path("/proc/x.png"), "No such file or directory"),
                          (tmp_path / "x.bmp", ".bmp is no picture format matplotlib writes (")):
        with pytest.raises(LabError) as info:
            timeline.plot(_idle(), path)
        assert info.value.message.startswith(f"cannot write the timeline to {path}: {problem}")
    assert timeline.plot(_idle(), tmp_path / "x") == tmp_path / "x.png"
    assert (tmp_path / "x.png").exists()


def _axes(fig: Figure) -> dict[str, Axes]:
    return {str(a.get_label()): a for a in fig.axes}


def _x(line: Line2D) -> list[float]:
    return [float(v) for v in cast("Sequence[float]", line.get_xdata())]


def _y(line: Line2D) -> list[float]:
    return [float(v) for v in cast("Sequence[float]", line.get_ydata())]


def test_throughput_per_pass_in_mbit_s_next_to_the_dirty_rate_in_mib_s() -> None:
    mig = {**_idle(), "total_ms": 1700, "bytes_sent": 160 * MIB,
           "pass_records": [_pass(1, 100.0, 0, 1024), _pass(2, 101.0, 100, 80, 20e6),
                            _pass(3, 101.5, 150, 10, 30e6)]}
    axes = _axes(timeline.figure(mig))
    rates, tp = axes["rates"], axes["throughput"]
    assert "(MiB)" in axes["memory"].get_ylabel()
    assert "(MiB/s)" in rates.get_ylabel() and "(Mbit/s)" in tp.get_ylabel()
    series = {str(line.get_label()): line for line in tp.get_lines()}
    per_pass = next(v for k, v in series.items() if k.startswith("link throughput"))
    # 100 MiB in 1 s, then 50 MiB in 0.5 s, each as a step over its pass
    assert _x(per_pass) == pytest.approx([0, 1, 1, 1.5])
    assert _y(per_pass) == pytest.approx([100 * MIB * 8 / 1e6] * 2
                                                       + [50 * MIB * 8 / 1e6 / 0.5] * 2)
    # the last pass runs to completion (t0 + total_ms); that end is QEMU's, an estimate
    last = next(v for k, v in series.items() if k.startswith("last pass"))
    assert "estimate" in str(last.get_label())
    assert _x(last) == pytest.approx([1.5, 1.7])
    assert _y(last) == pytest.approx([10 * MIB * 8 / 1e6 / 0.2] * 2)
    dirty = next(line for line in rates.get_lines() if "dirty-pages-rate" in str(line.get_label()))
    assert _y(dirty) == pytest.approx([20e6 / MIB, 30e6 / MIB])
    calc = next(line for line in rates.get_lines() if "calc-dirty-rate" in str(line.get_label()))
    assert "estimate" in str(calc.get_label())
    # one height is one amount of memory per second on both axes
    lo, hi = rates.get_ylim()
    assert tp.get_ylim() == pytest.approx((lo * MIB * 8 / 1e6, hi * MIB * 8 / 1e6))


def _outside(fig: Figure) -> list[str]:
    """Every line, patch and label drawn in a panel that reaches out of that panel."""
    fig.draw_without_rendering()
    out = []
    for ax in fig.axes:
        box = ax.get_window_extent()
        for art in [*ax.lines, *ax.patches, *ax.texts]:
            ext = art.get_window_extent()
            slack = 4 if art in ax.lines else 1  # a marker may stick out by its radius
            if (ext.x0 < box.x0 - slack or ext.x1 > box.x1 + slack
                    or ext.y0 < box.y0 - slack or ext.y1 > box.y1 + slack):
                out.append(f"{ax.get_label()}: {art!r} {ext} outside {box}")
    return out


def test_a_short_idle_migration_fits_its_axes_and_shows_its_zero_dirty_rate() -> None:
    mig = _idle()
    assert timeline.time_range(mig)[0] < 0.02 and timeline.time_range(mig)[1] > 0.79
    fig = timeline.figure(mig)
    axes = _axes(fig)
    # the guest's blackout (last beat 0.58 s -> first beat 0.79 s) lies inside the time axis
    lo, hi = axes["memory"].get_xlim()
    assert lo <= 0.0 and hi >= 0.79
    assert _outside(fig) == []
    # QEMU gave no dirty rate: a flat, labelled zero line and a note, not an empty axis
    rates = axes["rates"]
    zero = [line for line in rates.get_lines() if "dirty-pages-rate" in str(line.get_label())]
    assert len(zero) == 1 and _y(zero[0]) == [0.0, 0.0]
    assert "0 at every pass" in str(zero[0].get_label())
    assert any("no dirtying" in t.get_text() for t in rates.texts)
    assert rates.get_ylim()[0] < 0 < rates.get_ylim()[1]  # the zero line clears the frame


def _non_converging(n: int = 40) -> Record:
    """``n`` passes that do not converge: a long first pass, then ~0.6 s passes whose
    remaining stays near the working set, the last few quick (QEMU throttling the guest)."""
    passes, t = [_pass(1, 100.0, 0, 1024)], 110.5
    for i in range(2, n + 1):
        dt = 0.6 if i < n - 8 else 0.08
        passes.append(_pass(i, t, 500 + 30 * i, 60 if i < n - 8 else 5, 65e6))
        t += dt
    return {"id": 2, "vm": "vm1", "source": "a", "dest": "b", "policy": "converge",
            "storage": "early", "passes": n, "pass_records": passes,
            "decisions": [{"action": "raise_downtime", "at_pass": 5, "t_rel": 12.9},
                          {"action": "cancel", "at_pass": n, "t_rel": t - 100 - 0.05}]}


def _pass_labels(fig: Figure) -> list[Text]:
    return [t for t in _axes(fig)["memory"].texts if t.get_gid() == "pass-label"]


def test_pass_labels_are_thinned_so_they_never_collide() -> None:
    fig = timeline.figure(_non_converging(40))
    labels = _pass_labels(fig)
    texts = [t.get_text() for t in labels]
    assert 3 <= len(labels) <= 13, texts
    assert texts[0] == "1" and texts[-1] == "40"
    assert all(int(x) % 5 == 0 for x in texts[1:-1]), texts  # every 5th
    fig.draw_without_rendering()
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    assert all(a.x1 < b.x0 for a, b in itertools.pairwise(boxes)), boxes
    assert _outside(fig) == []
    # a handful of passes keeps a label each
    few = timeline.figure({**_non_converging(), "decisions": [],
                           "pass_records": [_pass(i, 100 + i, 30 * i, 60) for i in range(1, 7)]})
    assert [t.get_text() for t in _pass_labels(few)] == [str(i) for i in range(1, 7)]


def test_decisions_close_in_time_share_one_label() -> None:
    mig = _non_converging(12)
    mig["decisions"] = [{"action": "raise_downtime", "at_pass": 5, "t_rel": 12.9},
                        {"action": "raise_downtime", "at_pass": 6, "t_rel": 13.0},
                        {"action": "auto_converge", "at_pass": 7, "t_rel": 13.1},
                        {"action": "cancel", "at_pass": 12, "t_rel": 16.4}]
    fig = timeline.figure(mig)
    labels = [t for t in _axes(fig)["memory"].texts if t.get_gid() == "decision-label"]
    assert [t.get_text().splitlines() for t in labels] == [
        ["raise_downtime (pass 5)", "raise_downtime (pass 6)", "auto_converge (pass 7)"],
        ["cancel (pass 12)"]]
    assert _outside(fig) == []


def test_the_legends_sit_beside_the_panels_not_on_stop_and_resume() -> None:
    fig = timeline.figure(_idle())
    axes = _axes(fig)
    fig.draw_without_rendering()
    for beside, plotted in (("memory legend", [axes["memory"]]),
                            ("rates legend", [axes["rates"], axes["throughput"]])):
        assert all(a.get_legend() is None for a in plotted)  # nothing drawn over the data
        legend = axes[beside].get_legend()
        assert legend is not None and not axes[beside].axison
        box = legend.get_window_extent()
        for a in plotted:  # right of the panel, its ticks and axis labels included
            tight = a.get_tightbbox()
            assert tight is not None and box.x0 > tight.x1, (beside, box, tight)
    legend = axes["memory legend"].get_legend()
    assert legend is not None
    names = [t.get_text() for t in legend.get_texts()]
    assert "source QEMU STOP" in names and "destination QEMU RESUME" in names
    for line in axes["memory"].get_lines():
        assert not line.get_window_extent().overlaps(legend.get_window_extent())


def test_switchover_checkpoints_read_as_times_after_stop_and_qemu_downtime_is_stated() -> None:
    fig = timeline.figure(_idle())
    zoom = _axes(fig)["switchover"]
    texts = [t.get_text() for t in zoom.texts]
    # the last byte left 45 ms after STOP, in a stage of its own that took 0 ms
    last_byte = next(t for t in texts if "last byte" in t)
    assert "+45 ms after STOP" in last_byte, texts
    assert not last_byte.endswith(": 0 ms")
    assert any("final RAM sent: +30 ms after STOP" in t for t in texts), texts
    assert "QEMU's own downtime figure 45 ms" in zoom.get_title()
    assert _outside(fig) == []


def test_late_storage_preparation_shows_in_the_window_it_took() -> None:
    stop = 102.34
    mig = {**_idle(), "storage": "late", "stop_t_rel": stop - T0, "resume_t_rel": stop - T0 + 1.45,
           "total_ms": 3800, "downtime_ms": 1440, "blackout_ms": 1560.0,
           "pass_records": [_pass(1, 100.02, 0, 1024), _pass(2, 102.1, 400, 40),
                            _pass(3, 102.34, 446, 1)],
           "heartbeat": {"source_last": {"t_rel": stop - T0 - 0.04},
                         "dest_first": {"t_rel": stop - T0 + 1.52}},
           "late_window": {"storage_s": 1.31, "window_s": 1.36, "detected_after_stop_s": 0.03,
                           "dest": {}}}
    fig = timeline.figure(mig)
    axes = _axes(fig)
    band = [p for p in axes["memory"].patches if "late storage" in str(p.get_label())]
    assert len(band) == 1 and "1310 ms" in str(band[0].get_label())
    assert any("late storage preparation" in t.get_text() and "1310 ms" in t.get_text()
               for t in axes["switchover"].texts)
    assert _outside(fig) == []


def test_a_record_of_an_older_labctl_is_drawn_on_the_same_axis() -> None:
    """Records written before times were kept as offsets carry the agents' monotonic stamps
    (t0, stop_t, resume_t, a t in each heartbeat): they are brought onto the record's axis,
    so the same migration gives the same time range either way."""
    new = _idle()
    old = {**new, "t0": T0, "stop_t": T0 + 0.63, "resume_t": T0 + 0.70,
           "heartbeat": {"source_last": {"t": T0 + 0.58}, "dest_first": {"t": T0 + 0.79}}}
    del old["stop_t_rel"], old["resume_t_rel"]
    assert timeline.time_range(old) == pytest.approx(timeline.time_range(new))
    shown = timeline.on_own_axis(old)
    assert shown["stop_t_rel"] == pytest.approx(0.63)
    assert shown["heartbeat"]["dest_first"]["t_rel"] == pytest.approx(0.79)
