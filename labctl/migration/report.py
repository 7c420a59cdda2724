"""A migration record as text: one line per pass, the summary ``labctl migrate`` prints."""

from __future__ import annotations

from labctl.core.wire import Json
from labctl.migration.protocol import PassRecord
from labctl.migration.result import Record


def pass_line(p: PassRecord) -> str:
    """One pass record as a line (progress while migrating, ``labctl migrations show``)."""
    rate = p.dirty_rate_bytes or p.dirty_rate_est_bytes or 0
    return (f"pass {p.pass_:>3} t={p.t_rel:7.3f}s sync {p.dirty_sync_count} sent "
            f"{(p.transferred or 0) >> 20:5d} MiB remaining "
            f"{(p.remaining or 0) >> 20:5d} MiB dirty {rate / 1e6:6.1f} MB/s expected "
            f"downtime {p.expected_downtime_ms} ms throttle {p.throttle_pct}%")


def fmt_num(v: Json, w: int = 8) -> str:
    return f"{v:>{w}.0f}" if isinstance(v, int | float) else f"{'-':>{w}}"


def print_result(r: Record) -> None:
    """A migration's record (as stored, or as ``Migration.run`` returned it) for people."""
    print(f"migration {r.get('id')}: {r.get('vm')} {r.get('source')} -> {r.get('dest')}: "
          f"{r.get('state', 'completed')} (policy {r.get('policy')}, storage {r.get('storage')})")
    if r.get("error"):
        print(f"  error: {r['error']}")
        rec = r.get("recovery") or {}
        if rec:
            print(f"  recovery: source {rec.get('source')}, destination "
                  f"{rec.get('dest') or rec.get('dest_error')}")
    if r.get("total_ms") is not None:
        print(f"  total {r['total_ms']} ms (setup {r.get('setup_ms')} ms), QEMU downtime "
              f"{r.get('downtime_ms')} ms, guest blackout {r.get('blackout_ms') or 0:.0f} ms "
              f"(heartbeat every {r.get('heartbeat_period_ms') or 100:.0f} ms)")
        sw = r.get("switchover") or {}
        if sw.get("stop_to_resume_ms") is not None:
            print(f"  source STOP -> destination RESUME {sw['stop_to_resume_ms']:.0f} ms (host "
                  f"clock); blackout = {fmt_num(sw.get('hb_before_stop_ms'), 0)} ms last beat -> STOP "
                  f"+ {sw['stop_to_resume_ms']:.0f} + {fmt_num(sw.get('after_resume_ms'), 0)} ms RESUME "
                  f"-> first beat (one {sw.get('period_ms', 100):.0f} ms period + "
                  f"{fmt_num(sw.get('restart_overhead_ms'), 0)} ms guest restart overhead)")
        print(f"  {r.get('passes')} passes, {int(r.get('bytes_sent') or 0) >> 20} MiB sent "
              f"({r.get('mbps') or 0:.0f} Mbit/s)")
        dr = r.get("dirty_rate_measured") or {}
        if dr:
            print(f"  dirty rate before the migration (QEMU calc-dirty-rate, page sampling): "
                  f"{dr.get('dirty_rate_mib_s')} MiB/s")
    prep = (r.get("prepare") or {}).get("timings") or {}
    if prep:
        print(f"  destination prepared in {prep.get('prepare_s', 0):.3f} s before the source was "
              f"asked (QEMU {prep.get('qemu_start_s', 0):.3f} s"
              + (f", datastore check {prep['datastore_check_s']:.3f} s, read check "
                 f"{prep.get('read_check_s', 0):.3f} s" if "datastore_check_s" in prep else "")
              + ")")
    if r.get("late_window"):
        w = r["late_window"]
        print(f"  late storage preparation in the stopped window: {w['storage_s'] * 1000:.0f} ms "
              f"(window {w['window_s'] * 1000:.0f} ms)")
    hb = r.get("heartbeat") or {}
    if hb:
        disk = r.get("disk") or {}
        print(f"  guest verified on {r.get('dest')}: heartbeat "
              f"{(hb.get('source_last') or {}).get('counter')} -> "
              f"{(hb.get('dest_first') or {}).get('counter')} "
              f"({'continues' if hb.get('continues') else 'DOES NOT CONTINUE'}), disk counter "
              f"{disk.get('source_last')} -> read back {disk.get('dest_read')} "
              f"({'ok' if disk.get('ok') else 'STALE'})")
    for d in r.get("decisions") or []:
        print(f"  decision at pass {d.get('at_pass')}: {d.get('action')}: {d.get('reason')}")
