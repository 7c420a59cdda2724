"""Timeline picture of one migration (matplotlib, PNG), panels on one time axis origin (the
source's ``migrate`` command), one unit per kind of figure: memory in MiB, rates of memory
in MiB/s, link throughput in Mbit/s:

* memory: remaining dirty memory at each pass start, policy decisions, the source QEMU's
  STOP and the destination QEMU's RESUME, the guest's blackout;
* rates: the guest's dirty rate (QEMU's ``dirty-pages-rate`` where it gave one; the
  ``calc-dirty-rate`` estimate taken before the migration as a line) against the link
  throughput (bytes sent in each pass over its length), on aligned scales;
* switchover, zoomed in: the guest's last heartbeat on the source, STOP, QEMU's own
  checkpoints (final RAM sent, devices sent, last byte, destination loaded), each labelled
  by its time after STOP, RESUME and the first heartbeat on the destination, under QEMU's
  own downtime figure.
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from labctl.core.errors import LabError
from labctl.core.wire import Json
from labctl.drivers import figures
from labctl.migration.result import Record

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIB = 2**20
#: 1 MiB/s of memory is this many Mbit/s on the link
MBIT_PER_MIB = MIB * 8 / 1e6

#: QEMU's vmstate_downtime_checkpoint names (and the destination's own RESUME stamp), as
#: the zoom labels them
_STAGES = {"src-iterable-saved": "source QEMU: final RAM sent",
           "src-non-iterable-saved": "source QEMU: device state sent",
           "src-downtime-end": "source QEMU: last byte sent (its downtime ends)",
           "dst-precopy-loadvm-completed": "destination QEMU: all state loaded",
           "RESUME (QEMU stamp)": "destination QEMU: RESUME (its own stamp)"}


def plot(mig: Record, path: Path, title: str | None = None) -> Path:
    """Write the PNG for ``mig`` (a result dict as stored: pass_records, stop_t_rel, resume_t_rel,
    switchover, heartbeat, decisions, total_ms...) to ``path`` (see
    :func:`labctl.drivers.figures.save`); returns where it went."""
    return figures.save(figure(mig, title), path)


def figure(mig: Record, title: str | None = None) -> Figure:
    """The timeline of ``mig`` as a matplotlib figure (not pyplot's: nothing to close)."""
    mig = on_own_axis(mig)
    passes = mig.get("pass_records") or []
    if not passes:
        raise LabError("this migration recorded no passes: nothing to plot")
    t0 = 0.0  # the record's own time axis: seconds since migrate was sent
    xs = [p["t_rel"] - t0 for p in passes]
    remaining = [float(p.get("remaining") or 0) / MIB for p in passes]
    hb = mig.get("heartbeat") or {}
    last, first = hb.get("source_last") or {}, hb.get("dest_first") or {}
    stop_t, resume_t = mig.get("stop_t_rel"), mig.get("resume_t_rel")
    zoomable = bool(stop_t and resume_t and last.get("t_rel") and first.get("t_rel"))

    fig = figures.new_figure(figsize=(12, 9.5 if zoomable else 6.5), dpi=110,
                             layout="constrained")
    # the legends get a column of their own, where they cannot cover anything plotted
    grid = fig.add_gridspec(3 if zoomable else 2, 2, width_ratios=[1, 0.27],
                            height_ratios=[3, 2, 2.6] if zoomable else [3, 2])
    ax = fig.add_subplot(grid[0, 0], label="memory")
    ax.step(xs, remaining, where="post", color="tab:blue", lw=1.5,
            label="remaining dirty memory (MiB)")
    ax.plot(xs, remaining, "o", color="tab:blue", ms=4)
    lo, hi = time_range(mig)
    for i in _pass_labels(xs, [int(p["pass"]) for p in passes], hi - lo):
        ax.annotate(str(passes[i]["pass"]), (xs[i], remaining[i]), fontsize=7, color="tab:blue",
                    textcoords="offset points", xytext=(2, 4), gid="pass-label")
    ax.set_ylabel("remaining dirty memory (MiB)", color="tab:blue")
    ax.set_ylim(bottom=0, top=max([*remaining, 1.0]) * 1.12)
    ax.grid(alpha=0.3)
    axr = fig.add_subplot(grid[1, 0], sharex=ax, label="rates")
    axt = _rates(axr, mig, passes, t0)
    axr.set_xlabel("time since migrate (s)")

    decided: list[list[tuple[float, str]]] = []  # decisions close in time share a label
    for d in mig.get("decisions") or []:
        x = float(d.get("t_rel") or 0)
        ax.axvline(x, color="gray", ls=":", lw=1,
                   label="_" if decided else "policy decision (convergence)")
        if not decided or x - decided[-1][0][0] >= (hi - lo) * 0.035:
            decided.append([])
        decided[-1].append((x, f"{d['action']} (pass {d.get('at_pass')})"))
    for group in decided:  # from the top: remaining memory is low once the first pass is done
        ax.annotate("\n".join(text for _, text in group), (group[0][0], 0.97),
                    xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    color="dimgray", xytext=(3, 0), textcoords="offset points", va="top",
                    gid="decision-label")
    for a, named in ((ax, True), (axr, False)):  # the legend names them once
        if stop_t:
            a.axvline(float(stop_t) - t0, color="red", lw=1.2,
                      label="source QEMU STOP" if named else "_")
        if resume_t:
            a.axvline(float(resume_t) - t0, color="green", lw=1.2, ls="--",
                      label="destination QEMU RESUME" if named else "_")
        if last.get("t_rel") and first.get("t_rel"):
            a.axvspan(float(last["t_rel"]) - t0, float(first["t_rel"]) - t0, color="red", alpha=0.2,
                      label=f"guest blackout {mig.get('blackout_ms') or 0:.0f} ms (last "
                            f"heartbeat on the source -> first on the destination)"
                      if named else "_")
    late = _late_window(mig)
    if late:
        ax.axvspan(late[0] - t0, late[1] - t0, facecolor="none", edgecolor="tab:brown",
                   hatch="//", lw=0.8, label=f"late storage preparation on the destination: "
                   f"{(late[1] - late[0]) * 1000:.0f} ms (the source waits, stopped)")
    _legend(fig.add_subplot(grid[0, 1], label="memory legend"), ax)
    _legend(fig.add_subplot(grid[1, 1], label="rates legend"), axr, axt)
    sent = mig.get("bytes_sent")
    ttl = title or (f"migration {mig.get('id')}: {mig.get('vm')} {mig.get('source')} -> "
                    f"{mig.get('dest')}, policy {mig.get('policy')}, storage {mig.get('storage')}"
                    + (f", {mig['state']}" if mig.get("state") else "")
                    + f"\ntotal {_ms(mig.get('total_ms'))}, {mig.get('passes')} passes"
                    + (f", {sent / MIB:.0f} MiB sent" if isinstance(sent, int | float) else "")
                    + f"; QEMU downtime {_ms(mig.get('downtime_ms'))}, STOP -> RESUME "
                    f"{_ms(mig.get('stop_to_resume_ms'))}, guest blackout "
                    f"{_ms(mig.get('blackout_ms'))}")
    fig.suptitle(ttl, fontsize=9)

    if zoomable:
        assert stop_t is not None and resume_t is not None
        _zoom(fig.add_subplot(grid[2, :], label="switchover"), mig, float(stop_t),
              float(resume_t), float(last["t_rel"]), float(first["t_rel"]))
    ax.set_xlim(lo, hi)
    _fit_texts(fig)
    return fig


def time_range(mig: Record) -> tuple[float, float]:
    """The time axis (s since ``migrate``) that holds everything the time panels draw:
    the passes, the decisions, STOP, RESUME, the guest's blackout and the migration's end
    (QEMU's total time), with a margin on both sides."""
    mig = on_own_axis(mig)
    passes = mig.get("pass_records") or []
    t0 = 0.0
    hb = mig.get("heartbeat") or {}
    times = [0.0, *(p["t_rel"] - t0 for p in passes),
             *(float(d.get("t_rel") or 0) for d in mig.get("decisions") or []),
             *(float(t) - t0 for t in (mig.get("stop_t_rel"), mig.get("resume_t_rel"),
                                       (hb.get("source_last") or {}).get("t_rel"),
                                       (hb.get("dest_first") or {}).get("t_rel")) if t)]
    total_ms = mig.get("total_ms")
    if isinstance(total_ms, int | float):
        times.append(total_ms / 1000)
    times += [t - t0 for t in _late_window(mig) or ()]
    lo, hi = min(times), max(times)
    pad = (hi - lo) * 0.03 or 0.05
    return lo - pad, hi + pad


def on_own_axis(mig: Record) -> Record:
    """``mig`` with every time as seconds since ``migrate`` was sent (``t_rel``, as labctl
    records them now); a record written by an older labctl, with the agents' monotonic
    stamps (``t0``, ``stop_t``, ``resume_t``, a ``t`` in each pass and heartbeat), is
    brought onto that axis so that it can still be plotted."""
    t0 = mig.get("t0")
    if not isinstance(t0, int | float):
        return mig

    def rel(t: object) -> float | None:
        return float(t) - t0 if isinstance(t, int | float) else None

    hb = dict(mig.get("heartbeat") or {})
    for side in ("source_last", "dest_first"):
        if isinstance(hb.get(side), dict):
            hb[side] = {**hb[side], "t_rel": rel(hb[side].get("t"))}
    return {**mig, "stop_t_rel": rel(mig.get("stop_t")), "resume_t_rel": rel(mig.get("resume_t")),
            "heartbeat": hb or None}


def _late_window(mig: Record) -> tuple[float, float] | None:
    """When the destination prepared its storage late, in the pre-switchover window (the
    source stopped): start and end in seconds since migrate was sent."""
    w, stop = mig.get("late_window") or {}, mig.get("stop_t_rel")
    if not stop or not isinstance(w.get("storage_s"), int | float):
        return None
    start = float(stop) + float(w.get("detected_after_stop_s") or 0)
    return start, start + float(w["storage_s"])


def _pass_labels(xs: list[float], numbers: list[int], span: float, most: int = 12,
                 gap: float = 0.035) -> list[int]:
    """Which passes to number (indices): the first, the last and every k-th pass between,
    k = 1, 2, 5, 10, 20, 50... so that at most ``most`` are, and none closer to the next
    numbered one than ``gap`` of the time axis (``span`` s), where their labels would
    collide: many quick passes late in a migration share one label."""
    k = next(k for k in _steps() if len(xs) <= most * k)
    room = span * gap
    keep = [0]
    for i in reversed(range(1, len(xs))):  # from the last, which always shows when it can
        if (i == len(xs) - 1 or numbers[i] % k == 0) and xs[i] - xs[0] >= room \
                and (len(keep) == 1 or xs[keep[-1]] - xs[i] >= room):
            keep.append(i)
    return sorted(keep)


def _steps() -> Iterator[int]:
    """1, 2, 5, 10, 20, 50, 100..."""
    for decade in itertools.count():
        for m in (1, 2, 5):
            yield m * 10**decade


def _fit_texts(fig: Figure) -> None:
    """Widen each panel's x range to the right until every label anchored at a data point
    (pass numbers, decisions, the switchover's figures) ends inside the panel."""
    fig.draw_without_rendering()  # lays the figure out: text extents need it
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        box = ax.get_window_extent()
        need = hi
        for t in ax.texts:
            coords, xy = getattr(t, "xycoords", None), getattr(t, "xy", None)
            if xy is None or "data" not in (coords if isinstance(coords, tuple) else (coords,)):
                continue
            x = float(xy[0])
            beyond = t.get_window_extent().x1 - ax.transData.transform((x, 0))[0]
            room = box.width - beyond - 4
            if room > 0 and x > lo:
                need = max(need, lo + (x - lo) * box.width / room)
        if need > hi:
            ax.set_xlim(lo, need)


def _rates(ax: Axes, mig: Record, passes: list[Json], t0: float) -> Axes:
    """The guest's dirty rate (MiB/s, left) against what the link carried (Mbit/s, right),
    the two scales aligned so that the same height is the same amount of memory per second:
    a dirty rate above the throughput is a migration that cannot converge."""
    # QEMU's dirty-pages-rate (it measures over ~1 s periods, so short migrations have none).
    # Not "remaining / pass length": QEMU syncs the bitmap before a pass has sent everything,
    # so remaining also holds the previous pass's leftovers and overstates the rate.
    qemu = [(p["t_rel"] - t0, float(p["dirty_rate_bytes"]) / MIB) for p in passes
            if p.get("dirty_rate_bytes")]
    if qemu:
        ax.plot([q[0] for q in qemu], [q[1] for q in qemu], "s-", color="tab:orange", ms=4,
                lw=1, label="guest dirty rate: QEMU's dirty-pages-rate at each pass (MiB/s)")
    else:  # say so rather than leave the axis empty
        ax.plot([p["t_rel"] - t0 for p in passes], [0.0] * len(passes), "s-", color="tab:orange",
                ms=4, lw=1, label="guest dirty rate: QEMU's dirty-pages-rate, 0 at every pass")
        ax.annotate("no dirtying reported by QEMU (it measures over ~1 s periods: a shorter "
                    "migration may end before the first)", (0.01, 0.05),
                    xycoords="axes fraction", fontsize=7, color="tab:orange", va="bottom")
    calc = (mig.get("dirty_rate_measured") or {}).get("dirty_rate_mib_s")
    if isinstance(calc, int | float):
        ax.axhline(calc, color="tab:orange", ls="--", lw=1,
                   label=f"guest dirty rate before the migration (calc-dirty-rate, estimate "
                         f"from sampled pages): {calc:.0f} MiB/s")
    ax.set_ylabel("guest dirty rate (MiB/s)", color="tab:orange")
    ax.grid(alpha=0.3)

    axt = ax.twinx()
    axt.set_label("throughput")
    steps, tail = _throughput(mig, passes, t0)
    if steps:
        axt.plot([x for a, b, _ in steps for x in (a, b)], [v for *_, v in steps for _ in (0, 1)],
                 color="teal", lw=1.5, label="link throughput: bytes sent in each pass / its "
                 "length (Mbit/s)")
    if tail:
        axt.plot(tail[:2], [tail[2]] * 2, color="teal", lw=1.5, ls="--",
                 label="last pass to completion (Mbit/s, estimate: ends at QEMU's total time)")
    if not steps and not tail:
        axt.annotate("no link throughput: the passes carry no byte counts", (0.99, 0.05),
                     xycoords="axes fraction", fontsize=7, color="teal", va="bottom", ha="right")
    mbps = mig.get("mbps")
    if isinstance(mbps, int | float):
        axt.axhline(mbps, color="teal", ls=":", lw=1,
                    label=f"QEMU's average throughput: {mbps:.0f} Mbit/s")
    axt.set_ylabel(f"link throughput (Mbit/s)\n1 MiB/s = {MBIT_PER_MIB:.2f} Mbit/s",
                   color="teal")
    # the same height is the same memory per second on both axes
    top = max([q[1] for q in qemu] + [calc if isinstance(calc, int | float) else 0.0]
              + [v / MBIT_PER_MIB for *_, v in [*steps, *([tail] if tail else [])]]
              + [mbps / MBIT_PER_MIB if isinstance(mbps, int | float) else 0.0, 1.0]) * 1.15
    ax.set_ylim(-0.04 * top, top)
    axt.set_ylim(-0.04 * top * MBIT_PER_MIB, top * MBIT_PER_MIB)
    return axt


def _legend(where: Axes, *panels: Axes) -> None:
    """The legend of ``panels``, in the empty axes ``where`` beside them."""
    where.axis("off")
    handles, labels = [], []
    for panel in panels:
        h, lab = panel.get_legend_handles_labels()
        handles += h
        labels += [textwrap.fill(x, 36) for x in lab]
    where.legend(handles, labels, loc="upper left", fontsize=7, frameon=False,
                 borderaxespad=0)


def _throughput(mig: Record, passes: list[Json], t0: float) -> tuple[
        list[tuple[float, float, float]], tuple[float, float, float] | None]:
    """What the link carried, in Mbit/s, from QEMU's ``transferred`` counter: (start, end,
    Mbit/s) from each pass record to the next, and the last pass to completion, whose end is
    an estimate (``t0`` + QEMU's total time) and None when it is not known."""
    steps = []
    for a, b in itertools.pairwise(passes):
        dt = b["t_rel"] - a["t_rel"]
        if a.get("transferred") is not None and b.get("transferred") is not None and dt > 0:
            steps.append((a["t_rel"] - t0, b["t_rel"] - t0,
                          (b["transferred"] - a["transferred"]) * 8 / 1e6 / dt))
    total_ms, sent, lastp = mig.get("total_ms"), mig.get("bytes_sent"), passes[-1]
    if not isinstance(total_ms, int | float) or not isinstance(sent, int) \
            or lastp.get("transferred") is None:
        return steps, None
    start, end = lastp["t_rel"] - t0, total_ms / 1000
    if end - start < 0.01 or sent < lastp["transferred"]:
        return steps, None
    return steps, (start, end, (sent - lastp["transferred"]) * 8 / 1e6 / (end - start))


def _ms(v: Json) -> str:
    return f"{v:.0f} ms" if isinstance(v, int | float) else "-"


def _zoom(ax: Axes, mig: Record, stop: float, resume: float, last_hb: float,
          first_hb: float) -> None:
    """The switchover in ms after the source's STOP: the guest's blackout and its parts as
    bars, QEMU's checkpoints as the stages between them, each labelled by when it came
    after STOP (a stage can take 0 ms; the checkpoint still comes well after STOP)."""
    def rel(t: float) -> float:
        return (t - stop) * 1000

    sw = mig.get("switchover") or {}
    period = sw.get("period_ms") or 100
    rows: list[tuple[float, float, str, str]] = [
        (rel(last_hb), rel(first_hb), "tab:red", f"guest blackout: last beat on the source -> "
         f"first on the destination: {rel(first_hb) - rel(last_hb):.0f} ms"),
        (rel(last_hb), 0.0, "tab:olive",
         f"guest before STOP: since its last beat: {-rel(last_hb):.0f} ms"),
        (0.0, rel(resume), "tab:purple", f"source QEMU STOP -> destination QEMU RESUME (host "
         f"agents' stamps): {rel(resume):.0f} ms")]
    late = _late_window(mig)
    if late:
        rows.append((rel(late[0]), rel(late[1]), "tab:brown", f"destination: late storage "
                     f"preparation, the source waiting: {rel(late[1]) - rel(late[0]):.0f} ms"))
    prev = 0.0
    for key, v in (sw.get("checkpoints_ms") or {}).items():
        if isinstance(v, int | float):
            rows.append((prev, float(v), "tab:gray", f"{_STAGES.get(key, key)}: +{v:.0f} ms "
                         f"after STOP ({v - prev:.0f} ms after the previous)"))
            prev = float(v)
    rows.append((rel(resume), rel(first_hb), "tab:green", f"guest after RESUME: rest of its "
                 f"{period:.0f} ms heartbeat period + restart: {rel(first_hb) - rel(resume):.0f} ms"))
    for i, (a, b, color, text) in enumerate(rows):
        y = len(rows) - 1 - i  # the first row on top
        ax.barh(y, b - a, left=a, color=color, alpha=0.75, height=0.6)
        if color == "tab:gray":  # a checkpoint: a mark even when its stage took 0 ms
            ax.plot([b], [y], "d", color="dimgray", ms=4)
        ax.annotate(text, (max(a, b), y), xytext=(5, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.axvline(0, color="red", lw=1.2)
    ax.axvline(rel(resume), color="green", lw=1.2, ls="--")
    ax.set_yticks([])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    lo = min(a for a, *_ in rows)
    hi = max(b for _, b, *_ in rows)
    ax.set_xlim(lo - (hi - lo) * 0.05, hi + (hi - lo) * 0.05)  # widened for the labels
    ax.set_xlabel("ms after the source QEMU's STOP (red: STOP, dashed green: destination "
                  "RESUME; QEMU's checkpoints are on its own STOP stamp)")
    ax.set_title(f"switchover, zoomed: QEMU's own downtime figure "
                 f"{_ms(mig.get('downtime_ms'))}, STOP -> RESUME "
                 f"{_ms(mig.get('stop_to_resume_ms'))}, guest blackout "
                 f"{_ms(mig.get('blackout_ms'))}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
