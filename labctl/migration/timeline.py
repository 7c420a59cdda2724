"""Timeline picture of one migration (matplotlib, PNG), two panels on one time axis origin
(the source's ``migrate`` command):

* top: remaining dirty memory at each pass start, the guest's dirty rate (QEMU's
  ``dirty-pages-rate`` where it gave one; the ``calc-dirty-rate`` figure taken before the
  migration as a line), policy decisions, the
  source QEMU's STOP and the destination QEMU's RESUME, the guest's blackout;
* bottom: the switchover zoomed in: the guest's last heartbeat on the source, STOP, QEMU's
  own checkpoints (final RAM sent, devices sent, last byte, destination loaded), RESUME and
  the first heartbeat on the destination.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from labctl.core.errors import LabError, MissingDependency
from labctl.core.wire import Json
from labctl.migration.result import Record

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: QEMU's vmstate_downtime_checkpoint names, as the zoom labels them
_STAGES = (("src-iterable-saved", "source: final RAM sent"),
           ("src-non-iterable-saved", "source: device state sent"),
           ("src-downtime-end", "source: last byte (QEMU downtime ends)"),
           ("dst-precopy-loadvm-completed", "destination: all loaded"))


def plot(mig: Record, path: Path, title: str | None = None) -> Path:
    """Write the PNG for ``mig`` (a result dict as stored: pass_records, t0, stop_t, resume_t,
    switchover, heartbeat, decisions, total_ms...) to ``path``, whose directory must exist
    (a mistyped ``--plot`` directory is an error, not a new directory tree)."""
    if not path.parent.is_dir():
        raise LabError(f"cannot write the timeline to {path}: directory {path.parent} "
                       f"does not exist", path=str(path), directory=str(path.parent))
    figure(mig, title).savefig(path)
    return path


def figure(mig: Record, title: str | None = None) -> Figure:
    """The timeline of ``mig`` as a matplotlib figure (not pyplot's: nothing to close)."""
    try:
        # optional heavy modules, only for --plot
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependency("matplotlib is needed for --plot (pip install matplotlib; "
                                "scripts/setup.sh installs it)") from exc
    passes = mig.get("pass_records") or []
    if not passes:
        raise LabError("this migration recorded no passes: nothing to plot")
    t0 = float(mig.get("t0") or passes[0]["t"])
    xs = [p["t"] - t0 for p in passes]
    remaining = [float(p.get("remaining") or 0) / 2**20 for p in passes]
    hb = mig.get("heartbeat") or {}
    last, first = hb.get("source_last") or {}, hb.get("dest_first") or {}
    stop_t, resume_t = mig.get("stop_t"), mig.get("resume_t")
    sw = mig.get("switchover") or {}
    zoomable = bool(stop_t and resume_t and last.get("t") and first.get("t"))

    fig = Figure(figsize=(10, 7.5 if zoomable else 5), dpi=110)
    FigureCanvasAgg(fig)  # a canvas that can measure text, without pyplot's global state
    grid = fig.add_gridspec(2 if zoomable else 1, 1, height_ratios=[3, 2] if zoomable else [1])
    ax = fig.add_subplot(grid[0])
    ax.step(xs, remaining, where="post", color="tab:blue", lw=1.5, label="remaining dirty (MiB)")
    ax.plot(xs, remaining, "o", color="tab:blue", ms=4)
    for x, p in zip(xs, passes, strict=True):
        ax.annotate(str(p["pass"]), (x, float(p.get("remaining") or 0) / 2**20), fontsize=7,
                    textcoords="offset points", xytext=(2, 4), color="tab:blue")
    ax.set_xlabel("time since migrate (s)")
    ax.set_ylabel("remaining dirty memory (MiB)", color="tab:blue")
    ax.set_ylim(bottom=0, top=max([*remaining, 1.0]) * 1.5)  # room for the legend
    ax.grid(alpha=0.3)

    ax2 = ax.twinx()
    # QEMU's dirty-pages-rate (it measures over ~1 s periods, so short migrations have none).
    # Not "remaining / pass length": QEMU syncs the bitmap before a pass has sent everything,
    # so remaining also holds the previous pass's leftovers and overstates the rate.
    qemu = [(x, float(p["dirty_rate_bytes"]) / 1e6) for x, p in zip(xs, passes, strict=True)
            if p.get("dirty_rate_bytes")]
    if qemu:
        ax2.plot([q[0] for q in qemu], [q[1] for q in qemu], "s-", color="tab:orange", ms=4,
                 lw=1, label="guest dirty rate, QEMU's dirty-pages-rate at each pass (MB/s)")
    calc = (mig.get("dirty_rate_measured") or {}).get("dirty_rate_mib_s")
    if isinstance(calc, int | float):
        ax2.axhline(calc * 1.048576, color="tab:orange", ls="--", lw=1,
                    label=f"calc-dirty-rate before the migration: {calc * 1.048576:.0f} MB/s")
    ax2.set_ylabel("guest dirty rate (MB/s)", color="tab:orange")
    top = max([q[1] for q in qemu] + [calc * 1.048576 if isinstance(calc, int | float) else 0.0, 1.0])
    ax2.set_ylim(0, top * 1.7)

    for d in mig.get("decisions") or []:
        x = float(d.get("t_rel") or 0)
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.annotate(f"{d['action']} (pass {d.get('at_pass')})", (x, max(remaining) * 0.55),
                    rotation=90, fontsize=7, color="dimgray", xytext=(3, 0),
                    textcoords="offset points")
    if stop_t:
        ax.axvline(float(stop_t) - t0, color="red", lw=1.2, label="source QEMU STOP")
    if resume_t:
        ax.axvline(float(resume_t) - t0, color="green", lw=1.2, ls="--",
                   label="destination QEMU RESUME")
    if last.get("t") and first.get("t"):
        ax.axvspan(float(last["t"]) - t0, float(first["t"]) - t0, color="red", alpha=0.2,
                   label=f"guest blackout {mig.get('blackout_ms') or 0:.0f} ms")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right", ncol=2, framealpha=0.95)
    ttl = title or (f"migration {mig.get('id')}: {mig.get('vm')} {mig.get('source')} -> "
                    f"{mig.get('dest')}, policy {mig.get('policy')}, storage {mig.get('storage')}: "
                    f"total {mig.get('total_ms')} ms, {mig.get('passes')} passes, QEMU downtime "
                    f"{mig.get('downtime_ms')} ms, STOP->RESUME "
                    f"{_ms(mig.get('stop_to_resume_ms'))}, blackout {_ms(mig.get('blackout_ms'))}")
    ax.set_title(ttl, fontsize=9)

    if zoomable:
        assert stop_t is not None and resume_t is not None
        _zoom(fig.add_subplot(grid[1]), float(stop_t), float(resume_t), float(last["t"]),
              float(first["t"]), sw)
    fig.tight_layout()
    return fig


def _ms(v: Json) -> str:
    return f"{v:.0f} ms" if isinstance(v, int | float) else "-"


def _zoom(ax: Any, stop: float, resume: float, last_hb: float, first_hb: float,
          sw: dict[str, Json]) -> None:
    """The switchover in ms after the source's STOP, as stacked bars."""
    def rel(t: float) -> float:
        return (t - stop) * 1000

    cps = sw.get("checkpoints_ms") or {}
    rows: list[tuple[str, float, float, str]] = [
        ("guest: last beat on source -> first beat on destination (blackout)",
         rel(last_hb), rel(first_hb), "tab:red"),
        ("source QEMU STOP -> destination QEMU RESUME (host agents)", 0.0, rel(resume),
         "tab:purple")]
    prev = 0.0
    for key, label in _STAGES:
        v = cps.get(key)
        if isinstance(v, int | float):
            rows.append((label, prev, float(v), "tab:gray"))
            prev = float(v)
    period = sw.get("period_ms") or 100
    rows.append((f"guest after RESUME: rest of its {period:.0f} ms slice + restart", rel(resume),
                 rel(first_hb), "tab:green"))
    rows.append(("guest before STOP: since its last beat", rel(last_hb), 0.0, "tab:olive"))
    for i, (label, a, b, color) in enumerate(reversed(rows)):
        ax.barh(i, b - a, left=a, color=color, alpha=0.75, height=0.6)
        ax.annotate(f"{label}: {b - a:.0f} ms", (max(a, b), i), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=7)
    ax.axvline(0, color="red", lw=1.2)
    ax.axvline(rel(resume), color="green", lw=1.2, ls="--")
    ax.set_yticks([])
    lo, hi = min(rel(last_hb), 0.0), rel(first_hb)
    ax.set_xlim(lo - 20, hi + (hi - lo) * 1.1 + 40)
    ax.set_xlabel("ms after the source QEMU's STOP (0 = STOP, dashed = destination RESUME)")
    ax.set_title("switchover, zoomed: where the guest's blackout goes", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
