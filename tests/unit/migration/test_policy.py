"""Migration units: policy files, the convergence detector and policy on recorded pass data,
the disk record and qemu-io parsers, the timeline picture. No VM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from labctl.core.errors import LabError
from labctl.guest.protocol import decode_disk_record, fnv1a
from labctl.migration import timeline
from labctl.migration.convergence import ConvergencePolicy, not_converging
from labctl.migration.driver import switchover_breakdown
from labctl.migration.hostside import parse_checkpoints, parse_qemu_io_dump
from labctl.migration.policy import BUILTIN_POLICIES, load_policy, policy_from_dict
from labctl.migration.protocol import PassRecord
from labctl.migration.result import SideStamps

MIB = 1 << 20


def _pass(i: int, remaining_mib: float, dt: float) -> PassRecord:
    """Pass ``i + 1`` as the source reports it before QEMU knows the dirty rate."""
    return PassRecord(pass_=i + 1, t_rel=i * dt, status="active",
                      dirty_sync_count=i + 1, transferred=i * 50 * MIB,
                      remaining=int(remaining_mib * MIB), total=512 * MIB, dirty_pages_rate=0.0,
                      dirty_rate_bytes=0.0, expected_downtime_ms=int(remaining_mib * 20),
                      throttle_pct=0, mbps=None)


def _passes(remaining_mib: Sequence[float], dt: float = 0.5) -> list[PassRecord]:
    return [_pass(i, r, dt) for i, r in enumerate(remaining_mib)]


def test_builtin_policies_and_capabilities() -> None:
    assert {"default", "capped", "converge", "postcopy", "strict"} <= set(BUILTIN_POLICIES)
    conv = load_policy("converge")
    caps = conv.capabilities()
    assert caps["auto-converge"] and caps["events"] and not caps["postcopy-ram"]
    assert conv.parameters()["throttle-trigger-threshold"] == 100  # armed, dormant
    assert conv.parameters()["max-bandwidth"] == 50 * MIB
    assert load_policy("postcopy").capabilities()["postcopy-ram"]
    assert load_policy("late").capabilities()["pause-before-switchover"]
    assert not load_policy("default").capabilities()["pause-before-switchover"]


def test_policy_file(tmp_path: Path) -> None:
    f = tmp_path / "slow.yaml"
    f.write_text("base: capped\nmax_bandwidth_mib_s: 20\nconvergence:\n  window: 2\n"
                 "  actions: [raise_downtime, cancel]\n  downtime_steps_ms: [500, 900]\n")
    p = load_policy(str(f))
    assert p.name == "slow" and p.max_bandwidth_mib_s == 20 and p.convergence.window == 2
    assert p.convergence.downtime_steps_ms == (500, 900)
    for bad, where in (({"downtime_limit_ms": "fast"}, "downtime_limit_ms"),
                       ({"convergence": {"actions": ["pray"]}}, "convergence.actions[0]"),
                       ({"colour": 1}, "colour"), ({"storage": "sideways"}, "storage"),
                       ({"convergence": {"actions": ["postcopy"]}}, "postcopy: true"),
                       ({"base": "nope"}, "base")):
        with pytest.raises(LabError, match=where.replace("[", r"\[").replace("]", r"\]")):
            policy_from_dict(bad, "x.yaml")
    with pytest.raises(LabError, match="no migration policy"):
        load_policy("no-such-policy")


@pytest.mark.parametrize(("content", "problem"), [
    (bytes(range(256)), "not text (byte 128 is not UTF-8): not a migration policy file (YAML text)"),
    (b"x" * (1 << 20) + b"\n", "larger than 1 MiB: not a migration policy file (YAML text)"),
    (b"convergence: " + b"[" * 5000 + b"]" * 5000, "nested more than 32 levels deep"),
    (b"convergence: &c {actions: *c}", "nested more than 32 levels deep"),
    (b"base: [capped", "invalid YAML: line 1, column 14: expected ',' or ']', but got '<stream end>'"),
    (b"base: capped\x00", "invalid YAML: special characters are not allowed"),
    (b"timeout_s: 2024-13-01", "invalid YAML: a value cannot be read (month must be in 1..12)"),
    (b"base: [capped]", "base: unknown policy ['capped'] (built in: default, capped, converge, "
                        "postcopy, strict, multifd, late)"),
    (b"{1: a, null: b}", "1: unknown field (known: auto_converge, base, convergence, "
                         "downtime_limit_ms, lease_s, max_bandwidth_mib_s, multifd_channels, "
                         "name, postcopy, stall_timeout_s, storage, timeout_s)"),
])
def test_a_policy_file_that_is_no_policy_is_one_line(tmp_path: Path, content: bytes,
                                                     problem: str) -> None:
    """Binary garbage, deep nesting (the YAML composer's recursion overflowed), a YAML
    alias that refers to itself, keys a mapping cannot sort: one line naming the file."""
    f = tmp_path / "p.yaml"
    f.write_bytes(content)
    with pytest.raises(LabError) as info:
        load_policy(str(f))
    assert info.value.message == f"migration policy {f}: {problem}"


def test_a_directory_is_no_policy(tmp_path: Path) -> None:
    with pytest.raises(LabError) as info:
        load_policy(str(tmp_path))
    assert info.value.message == (f"migration policy {tmp_path}: is a directory, not a migration "
                                  "policy file (YAML text)")


def test_detector_converging_migration_is_left_alone() -> None:
    passes = _passes([256, 90, 40, 18, 8, 3])
    assert not_converging(passes, 0, 3, 0.1) is None


def test_detector_fires_within_five_passes_on_flat_remaining() -> None:
    passes = _passes([256, 60, 58, 61, 59, 60, 62])
    fired = [n for n in range(1, len(passes) + 1) if not_converging(passes[:n], 0, 3, 0.1)]
    assert fired and fired[0] <= 5
    assert "not falling over 3 passes" in (not_converging(passes[:5], 0, 3, 0.1) or "")


def test_policy_walks_its_actions_and_records_reasons() -> None:
    pol = ConvergencePolicy(load_policy("converge"))
    flat = _passes([256] + [60] * 30)
    actions = []
    for n in range(1, len(flat) + 1):
        d = pol.decide(flat[:n], float(n))
        if d is not None:
            actions.append((d.action, d.detail.get("downtime-limit"), d.at_pass))
            assert d.reason
            if d.action == "cancel":
                break
    assert [a for a, _, _ in actions] == ["raise_downtime"] * 3 + ["auto_converge", "cancel"]
    assert [x for _, x, _ in actions[:3]] == [600, 1200, 2400]
    assert actions[0][2] is not None and actions[0][2] <= 5


def test_disk_record_and_qemu_io_dump() -> None:
    import struct


    head = b"LABCTLDC" + struct.pack("<Q", 42)
    sector = head + struct.pack("<Q", fnv1a(head)) + bytes(488)
    assert decode_disk_record(sector) == 42
    assert decode_disk_record(bytes(512)) == 0
    assert decode_disk_record(head + bytes(8) + bytes(488)) is None
    dump = "".join(f"{i * 16:08x}:  " + " ".join(f"{b:02x}" for b in sector[i * 16:i * 16 + 16])
                   + "  ................\n" for i in range(32)) + "read 512/512 bytes at offset 0\n"
    data, err = parse_qemu_io_dump(dump)
    assert err is None and data == sector
    assert parse_qemu_io_dump("read failed: Input/output error\n")[1]


def test_timeline_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")

    passes = [p.replace(dirty_rate_bytes=10e6).to_wire() for p in _passes([256, 90, 40, 18])]
    mig = {"id": 1, "vm": "vm1", "source": "a", "dest": "b", "policy": "default",
           "storage": "early", "stop_t_rel": 1.6, "total_ms": 1700, "downtime_ms": 90,
           "blackout_ms": 180.0, "pass_records": passes,
           "heartbeat": {"source_last": {"t_rel": 1.58}, "dest_first": {"t_rel": 1.76}},
           "decisions": [{"action": "raise_downtime", "t_rel": 1.2}]}
    out = timeline.plot(mig, tmp_path / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # with the switchover zoom (RESUME, checkpoints) and a calc-dirty-rate line
    sw = switchover_breakdown(SideStamps(1.6, checkpoints={"src-downtime-end": 1.69}),
                              SideStamps(1.7), 1.58, 1.76)
    out = timeline.plot({**mig, "resume_t_rel": 1.7, "switchover": sw.to_wire(),
                         "dirty_rate_measured": {"dirty_rate_mib_s": 38}}, tmp_path / "z.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LabError):
        timeline.plot({**mig, "pass_records": []}, tmp_path / "u.png")


def test_checkpoint_lines_parsed() -> None:
    log = ("1234@1795709025.306374:vmstate_downtime_save type=non-iterable idstr=hpet\n"
           "1234@1795709025.308206:vmstate_downtime_checkpoint src-non-iterable-saved\n"
           "2026-11-26T16:00:00.000000Z qemu-system-x86_64: something else\n"
           "1234@1795709025.309331:vmstate_downtime_checkpoint src-downtime-end\n"
           "1234@1795709026.000000:vmstate_downtime_checkpoint src-downtime-end\n")
    cps = parse_checkpoints(log)
    assert cps == {"src-non-iterable-saved": 1795709025.308206, "src-downtime-end": 1795709025.309331}


def test_switchover_breakdown_adds_up() -> None:
    src = SideStamps(t=10.0, qemu_t=10.001,
                     checkpoints={"src-iterable-saved": 10.081, "src-downtime-end": 10.091})
    dst = SideStamps(t=10.12, qemu_t=10.119,
                     checkpoints={"dst-precopy-loadvm-completed": 10.118})
    sw = switchover_breakdown(src, dst, last_src_hb_t=9.96, first_dst_hb_t=10.19)
    assert sw.stop_to_resume_ms == pytest.approx(120)
    assert sw.stop_to_resume_qemu_ms == pytest.approx(118)
    assert sw.hb_before_stop_ms == pytest.approx(40)
    assert sw.after_resume_ms == pytest.approx(70)
    assert sw.restart_overhead_ms == pytest.approx(10)
    # blackout = last beat -> STOP + STOP -> RESUME + RESUME -> first beat
    assert sw.hb_before_stop_ms is not None and sw.after_resume_ms is not None
    assert sw.hb_before_stop_ms + sw.stop_to_resume_ms + sw.after_resume_ms == \
        pytest.approx((10.19 - 9.96) * 1000)
    assert list(sw.checkpoints_ms) == ["src-iterable-saved", "src-downtime-end",
                                       "dst-precopy-loadvm-completed", "RESUME (QEMU stamp)"]
    assert sw.checkpoints_ms["src-downtime-end"] == pytest.approx(90)
    # the stored form keeps the keys the report and the timeline read
    assert sw.to_wire()["stop_to_resume_ms"] == sw.stop_to_resume_ms
    # a side that reported nothing: no numbers, no crash
    assert switchover_breakdown(SideStamps(), SideStamps(), None, None).stop_to_resume_ms is None
    # a 20 ms heartbeat (labctl.hb_ms=20): one period is 20 ms of the blackout, not 100
    sw20 = switchover_breakdown(src, dst, last_src_hb_t=9.99, first_dst_hb_t=10.135, period_ms=20)
    assert sw20.period_ms == 20
    assert sw20.restart_overhead_ms == pytest.approx(10 + 15 - 20)


def test_rate_rule_detects_by_pass_4() -> None:
    """A guest dirtying 65 MB/s over a 50 MiB/s cap: remaining stays at the working set but
    shrinks a little after the long first pass; the rate rule fires as soon as QEMU's dirty
    rate is known for two passes."""
    rem = [256, 70, 48, 45, 46, 47]
    passes = [p.replace(dirty_rate_bytes=65e6, mbps=50 * 8.388608, expected_downtime_ms=900)
              for p in _passes(rem)]
    fired = [n for n in range(1, len(passes) + 1) if not_converging(passes[:n], 0, 3, 0.1, 300)]
    assert fired and fired[0] == 4
    assert "as fast as it is sent" in (not_converging(passes[:4], 0, 3, 0.1, 300) or "")
    # the window rule alone would wait until pass 6 here
    assert next(n for n in range(1, 7) if not_converging(passes[:n], 0, 3, 0.1)) == 6
    # a guest slower than the link, or QEMU expecting a downtime within the limit: no
    slow = [p.replace(dirty_rate_bytes=40e6) for p in passes[:4]]
    assert not_converging(slow, 0, 3, 0.1, 300) is None
    near = [p.replace(expected_downtime_ms=250) for p in passes[:4]]
    assert not_converging(near, 0, 3, 0.1, 300) is None


def test_auto_converge_gets_its_throttle_ramp_before_the_next_action() -> None:
    """QEMU raises the throttle a step per pass, starting ~2 passes after auto-converge is
    turned on; the policy must not cancel while the throttle is still rising."""
    pol = ConvergencePolicy(load_policy("converge"))
    pol.downtime_ms = 2400
    pol.action_index = 1  # the downtime steps are used up: auto_converge is next
    throttle = [0] * 6 + [0, 30, 50, 70, 90, 99] + [99] * 20
    flat = [p.replace(throttle_pct=t)
            for p, t in zip(_passes([256] + [60] * 30), throttle, strict=False)]
    got = []
    for n in range(1, len(flat) + 1):
        d = pol.decide(flat[:n], float(n))
        if d is not None:
            got.append((d.action, d.at_pass))
            if d.action == "cancel":
                break
    assert [a for a, _ in got] == ["auto_converge", "cancel"], got
    ac_pass = got[0][1]
    cancel_pass = got[1][1]
    assert ac_pass is not None and cancel_pass is not None
    first_full = throttle.index(99) + 1  # pass numbers count from 1
    assert cancel_pass > first_full, got  # judged only once the throttle was at its max
