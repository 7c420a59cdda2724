"""Timeline picture of one migration: remaining bytes and dirty rate per pass, with the
switchover (source stopped) and the guest's blackout marked. matplotlib, PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labctl.errors import LabError, MissingDependency


def plot(mig: dict[str, Any], path: Path, title: str | None = None) -> Path:
    """Write the PNG for ``mig`` (a result dict as stored: pass_records, t0, stop_t,
    heartbeat, decisions, total_ms...) to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependency("matplotlib is needed for --plot (pip install matplotlib; "
                                "scripts/setup.sh installs it)") from exc
    passes = mig.get("pass_records") or []
    if not passes:
        raise LabError("this migration recorded no passes: nothing to plot")
    t0 = float(mig.get("t0") or passes[0]["t"])
    xs = [p["t"] - t0 for p in passes]
    remaining = [float(p.get("remaining") or 0) / 2**20 for p in passes]
    rates = []
    for p in passes:
        r = p.get("dirty_rate_bytes") or p.get("dirty_rate_est_bytes") or 0.0
        rates.append(float(r) / 1e6)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    ax.step(xs, remaining, where="post", color="tab:blue", label="remaining (MiB)")
    ax.plot(xs, remaining, "o", color="tab:blue", ms=4)
    for x, p in zip(xs, passes, strict=True):
        ax.annotate(str(p["pass"]), (x, float(p.get("remaining") or 0) / 2**20), fontsize=7,
                    textcoords="offset points", xytext=(2, 4))
    ax.set_xlabel("time since migrate (s)")
    ax.set_ylabel("remaining dirty memory (MiB)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, rates, "s--", color="tab:orange", ms=3, label="dirty rate (MB/s)")
    ax2.set_ylabel("dirty rate (MB/s): QEMU's, else pages dirtied per pass", color="tab:orange")
    ax2.set_ylim(bottom=0)
    stop_t = mig.get("stop_t")
    if stop_t:
        ax.axvline(float(stop_t) - t0, color="red", lw=1.2, label="switchover (source stopped)")
    hb = mig.get("heartbeat") or {}
    last, first = hb.get("source_last") or {}, hb.get("dest_first") or {}
    if last.get("t") and first.get("t"):
        ax.axvspan(float(last["t"]) - t0, float(first["t"]) - t0, color="red", alpha=0.15,
                   label=f"guest blackout {mig.get('blackout_ms', 0):.0f} ms")
    for d in mig.get("decisions") or []:
        ax.axvline(float(d.get("t_rel") or 0), color="gray", ls=":", lw=1)
        ax.annotate(d["action"], (float(d.get("t_rel") or 0), max(remaining) * 0.9), rotation=90,
                    fontsize=7, color="gray")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper right")
    ax.set_ylim(bottom=0)
    ttl = title or (f"migration {mig.get('id')}: {mig.get('vm')} {mig.get('source')} -> "
                    f"{mig.get('dest')}, policy {mig.get('policy')}, storage {mig.get('storage')}: "
                    f"total {mig.get('total_ms')} ms, downtime {mig.get('downtime_ms')} ms")
    ax.set_title(ttl, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
