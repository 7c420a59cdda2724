"""Timeline picture of one replication (matplotlib), on one time axis (seconds since it
began), one unit per panel:

* passes: each pass as a bar over its time, its height the MiB it sent (the final pass in
  red, a failed attempt hatched), the criterion's decision above it;
* rates: the dirty rate each pass found and the rate it moved the disk's bytes at (MiB/s);
* RPO: how old the newest data the destination held was at the end of each pass, and the
  outage (the application's last acknowledgement on the source to its first on the
  destination) as a shaded span.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from labctl.core.errors import LabError
from labctl.core.wire import Json
from labctl.drivers import figures

MIB = 2**20


def _t(stamp: Json) -> float:
    """A wall time as the records keep it (ISO text, or seconds) as seconds."""
    if isinstance(stamp, int | float):
        return float(stamp)
    return datetime.fromisoformat(str(stamp)).timestamp()


def plot(rec: dict[str, Json], path: Path) -> Path:
    """Write the timeline of replication ``rec`` (as ``replication show --json`` gives
    it) to ``path``; returns where it went."""
    passes = [p for p in rec.get("passes") or [] if isinstance(p, dict)]
    if not passes:
        raise LabError("this replication recorded no passes: nothing to plot")
    t0 = _t(rec["started_at"])
    fig = figures.new_figure(figsize=(12, 8), dpi=110, layout="constrained")
    ax, rates, rpo = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 2])
    for p in passes:
        start = _t(p["started_at"]) - t0
        width = max(float(p["seconds"]), 0.5)
        failed = p["how"] == "failed"
        color = ("tab:red" if p["how"] == "final" else "tab:gray" if failed
                 else "tab:olive" if p["how"] == "precheck" else "tab:blue")
        height = float(p["bytes"]) / MIB
        ax.bar(start, height if not failed else 1.0, width=width, align="edge", color=color,
               alpha=0.8, hatch="//" if failed else None, edgecolor="black", lw=0.5)
        label = "failed" if failed else f"#{p['n']} {p['how']}\n{p['decision']}"
        ax.annotate(label, (start + width / 2, height), ha="center", va="bottom",
                    fontsize=7)
    ax.set_ylabel("sent per pass (MiB)")
    ax.set_title(f"replication {rec['id']}: {rec['vm']} {rec['from_site']} -> "
                 f"{rec['to_site']} ({rec['state']}); switch over when {rec['switchover']}",
                 fontsize=9)
    done = [p for p in passes if p["how"] not in ("failed", "final", "precheck")]
    ends = [_t(p["started_at"]) - t0 + float(p["seconds"]) for p in done]
    rates.step(ends, [float(p["dirty_rate"]) / MIB for p in done], where="pre",
               label="dirty rate found (MiB/s)", color="tab:orange")
    rates.step(ends, [float(p["link_rate"]) / MIB for p in done], where="pre",
               label="link rate, the disk's bytes (MiB/s)", color="tab:green")
    rates.set_ylabel("MiB/s")
    rates.legend(fontsize=7, loc="upper right")
    rpo.plot(ends, [float(p["rpo_s"]) for p in done], "o-", color="tab:purple",
             label="RPO at the pass's end (s)")
    cut = rec.get("cutover")
    if isinstance(cut, dict) and cut.get("source_acked_at") and cut.get("dest_first_acked_at"):
        a = _t(cut["source_acked_at"]) - t0
        b = _t(cut["dest_first_acked_at"]) - t0
        for panel in (ax, rates, rpo):
            panel.axvspan(a, b, color="tab:red", alpha=0.12)
        rpo.annotate(f"outage {cut.get('outage_s')} s", ((a + b) / 2, 0), ha="center",
                     va="bottom", fontsize=8, color="tab:red")
    rpo.set_ylabel("seconds")
    rpo.set_xlabel("seconds since the replication began")
    rpo.legend(fontsize=7, loc="upper right")
    return figures.save(fig, path)
