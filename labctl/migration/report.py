"""A migration record as text: one line per pass, the summary ``labctl migrate`` prints."""

from __future__ import annotations

import json

from labctl.core.errors import ProtocolError
from labctl.core.wire import Json
from labctl.migration.protocol import PassRecord
from labctl.migration.result import Record, Recovery


def pass_line(p: PassRecord) -> str:
    """One pass record as a line (progress while migrating, ``labctl migration show``).
    Memory in MiB and MiB/s; QEMU's own figures, the dirty rate estimated from the pass
    (pages dirtied during it over its length) labelled as such."""
    if p.dirty_rate_bytes:
        dirty = f"dirty {p.dirty_rate_bytes / MIB:6.1f} MiB/s (QEMU)"
    elif p.dirty_rate_est_bytes:
        dirty = f"dirty {p.dirty_rate_est_bytes / MIB:6.1f} MiB/s (estimate)"
    else:
        dirty = "dirty      - MiB/s"
    expected = "-" if p.expected_downtime_ms is None else f"{p.expected_downtime_ms}"
    return (f"pass {p.pass_:>3} t={p.t_rel:7.3f}s sync {p.dirty_sync_count or '-'} sent "
            f"{(p.transferred or 0) >> 20:5d} MiB remaining {(p.remaining or 0) >> 20:5d} MiB "
            f"{dirty} expected downtime {expected} ms throttle {p.throttle_pct or 0}%")


MIB = 1 << 20


def fmt_num(v: Json, w: int = 8) -> str:
    return f"{v:>{w}.0f}" if isinstance(v, int | float) else f"{'-':>{w}}"


def recovery_line(rec: Recovery, source: str, dest: str) -> str:
    """What the recovery after a failed or cancelled migration found, in words."""
    parts = []
    if rec.note:
        parts.append(rec.note)
    if rec.source is not None:
        s = rec.source
        parts.append(f"the VM runs on {source} again (heartbeat {s.heartbeat_before} -> "
                     f"{s.heartbeat_after})" if s.alive else
                     f"the VM does not beat on {source} (QEMU {s.status})")
    elif rec.source_error:
        parts.append(f"{source}: {rec.source_error}")
    if rec.dest is not None:
        parts.append(f"{dest}: incoming VM dropped" if rec.dest.removed else
                     f"{dest}: nothing left to drop")
    elif rec.dest_error:
        parts.append(f"{dest}: {rec.dest_error}")
    return "; ".join(parts) or "nothing to recover"


def _row(key: str, value: str) -> None:
    print(f"  {key + ':':<24}{value}")


def print_result(r: Record) -> None:
    """A migration's record (as stored, or as ``Migration.run`` returned it) for people: a
    header line, then one ``key: value`` per line, as ``virsh domjobinfo`` prints a job."""
    print(f"migration {r.get('id')}: {r.get('vm')} {r.get('source')} -> {r.get('dest')}: "
          f"{r.get('state', 'completed')}")
    _row("policy", f"{r.get('policy')} (destination storage prepared {r.get('storage')})")
    if r.get("error"):
        _row("error", str(r["error"]))
        rec = r.get("recovery")
        if isinstance(rec, dict):
            try:
                _row("recovery", recovery_line(Recovery.from_wire(rec), str(r.get("source")),
                                               str(r.get("dest"))))
            except ProtocolError:
                _row("recovery", json.dumps(rec, default=str))
    if r.get("total_ms") is not None:
        _row("time elapsed", f"{r['total_ms']} ms (setup {r.get('setup_ms')} ms)")
        _row("QEMU downtime", f"{r.get('downtime_ms')} ms")
        sw = r.get("switchover") or {}
        if sw.get("stop_to_resume_ms") is not None:
            _row("STOP -> RESUME", f"{sw['stop_to_resume_ms']:.0f} ms (source STOP event to "
                                   "destination RESUME event, host clock)")
        period = r.get("heartbeat_period_ms") or 100
        _row("guest blackout", f"{r.get('blackout_ms') or 0:.0f} ms (heartbeat every "
                               f"{period:.0f} ms)")
        if sw.get("stop_to_resume_ms") is not None:
            _row("  of which", f"{fmt_num(sw.get('hb_before_stop_ms'), 0)} ms last beat -> STOP"
                               f" + {sw['stop_to_resume_ms']:.0f} ms STOP -> RESUME + "
                               f"{fmt_num(sw.get('after_resume_ms'), 0)} ms RESUME -> first beat"
                               f" (one period + {fmt_num(sw.get('restart_overhead_ms'), 0)} ms "
                               "guest restart overhead)")
        _row("passes", str(r.get("passes")))
        _row("memory sent", f"{int(r.get('bytes_sent') or 0) >> 20} MiB")
        _row("throughput", f"{r.get('mbps') or 0:.0f} Mbit/s (QEMU's figure)")
        dr = r.get("dirty_rate_measured") or {}
        if dr:
            _row("dirty rate before", f"{dr.get('dirty_rate_mib_s')} MiB/s (QEMU calc-dirty-rate,"
                                      " page sampling)")
    prep = (r.get("prepare") or {}).get("timings") or {}
    if prep:
        _row("destination prepared", f"{prep.get('prepare_s', 0):.3f} s before the source was "
             f"asked (QEMU {prep.get('qemu_start_s', 0):.3f} s"
             + (f", datastore check {prep['datastore_check_s']:.3f} s, read check "
                f"{prep.get('read_check_s', 0):.3f} s" if "datastore_check_s" in prep else "")
             + ")")
    if r.get("late_window"):
        w = r["late_window"]
        _row("late storage", f"{w['storage_s'] * 1000:.0f} ms of storage work in the stopped "
                             f"window ({w['window_s'] * 1000:.0f} ms)")
    if r.get("mirror"):
        m = r["mirror"]
        _row("disk mirror", f"{m['bytes'] / (1 << 20):.1f} MiB to {m['target']}"
             + (f", in sync after {m['sync_s']:.1f} s" if m.get("sync_s") is not None else "")
             + f", completed in the stopped window in {m['complete_s'] * 1000:.0f} ms")
    hb = r.get("heartbeat") or {}
    if hb:
        disk = r.get("disk") or {}
        xs = r.get("cross_site") or {}
        where = (f"in {xs.get('to_site')} (reported through {r.get('dest')})"
                 if xs.get("half") == "outgoing" else f"on {r.get('dest')}")
        _row("guest verified", f"{where}: heartbeat "
             f"{(hb.get('source_last') or {}).get('counter')} -> "
             f"{(hb.get('dest_first') or {}).get('counter')} "
             f"({'continues' if hb.get('continues') else 'DOES NOT CONTINUE'}), disk counter "
             f"{disk.get('source_last')} -> read back {disk.get('dest_read')} "
             f"({'ok' if disk.get('ok') else 'STALE'})")
    for d in r.get("decisions") or []:
        _row(f"decision at pass {d.get('at_pass')}", f"{d.get('action')}: {d.get('reason')}")
