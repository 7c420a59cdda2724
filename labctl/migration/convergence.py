"""Convergence: detecting a pre-copy migration that is not converging, and walking the
policy's actions (raise the downtime limit in steps, auto-converge, post-copy, cancel)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from labctl.core.wire import Message
from labctl.migration.policy import Policy
from labctl.migration.protocol import Parameters, PassRecord

MAX_CPU_THROTTLE = 99  # QEMU's default max-cpu-throttle (%)


def not_converging(passes: Sequence[PassRecord], since: int, window: int,
                   min_improvement: float, downtime_limit_ms: float | None = None) -> str | None:
    """Why the migration is not converging, or None.

    ``passes`` are pass records in order; only those at index >= ``since`` count (the
    detector restarts after each action). Pass 1 sends all of memory, so it is skipped.
    Two rules, the first that holds wins:

    * *rate*: on the last two passes (pass 3 on: QEMU's dirty rate needs a second of
      history), the guest dirtied memory at least ``1 - min_improvement`` times as fast as
      the migration sent it (QEMU's ``dirty-pages-rate`` against its ``mbps``) and QEMU
      still expected more downtime than ``downtime_limit_ms``: remaining cannot fall;
    * *window*: the dirty memory left at the start of each pass (``remaining``, the expected
      downtime times the bandwidth) made no new low, over the last ``window`` passes, at
      least ``min_improvement`` below the best before them. A guest whose working set is
      dirtied faster than the link carries it keeps ``remaining`` near the working set, but
      the passes after the long first one can still shrink a little, so this rule alone may
      first fire at pass ``window + 3``.
    """
    seq = [(p, p.remaining) for p in passes[since:] if p.pass_ >= 2 and p.remaining is not None]
    rated = [p for p, _ in seq if p.pass_ >= 3][-2:]
    if downtime_limit_ms is not None and len(rated) == 2 and all(
            p.dirty_rate_bytes > 0 and (p.mbps or 0) > 0
            and (p.expected_downtime_ms or 0) > downtime_limit_ms for p in rated) and all(
            p.dirty_rate_bytes >= (1.0 - min_improvement) * (p.mbps or 0) * 1e6 / 8
            for p in rated):
        dirty = ", ".join(f"{p.dirty_rate_bytes / 1e6:.0f}" for p in rated)
        sent = ", ".join(f"{(p.mbps or 0) / 8:.0f}" for p in rated)
        return (f"the guest dirties memory as fast as it is sent (passes "
                f"{rated[0].pass_}-{rated[1].pass_}: dirty {dirty} MB/s, "
                f"sent {sent} MB/s; expected "
                f"downtime {[p.expected_downtime_ms for p in rated]} ms > "
                f"{downtime_limit_ms:g} ms)")
    if len(seq) < window + 1:
        return None
    before = min(float(r) for _, r in seq[:-window])
    recent = seq[-window:]
    best = min(float(r) for _, r in recent)
    if best > (1.0 - min_improvement) * before:
        exp = [p.expected_downtime_ms for p, _ in recent]
        return (f"remaining dirty memory not falling over {window} passes "
                f"(best {best / 2**20:.1f} MiB vs {before / 2**20:.1f} MiB before; "
                f"passes {recent[0][0].pass_}-{recent[-1][0].pass_}, expected downtime {exp} ms)")
    return None


@dataclass(frozen=True)
class Decision(Message):
    """What the convergence policy decided, at which pass and when (seconds since the
    driver started watching); ``detail``: the QEMU parameters the action sets."""

    action: str  # raise_downtime, auto_converge, postcopy, cancel
    reason: str
    at_pass: int | None
    t_rel: float
    detail: Parameters = field(default_factory=dict)


class ConvergencePolicy:
    """Walks the policy's action list each time the detector fires."""

    def __init__(self, policy: Policy) -> None:
        self.conv = policy.convergence
        self.since = 0
        self.action_index = 0
        self.downtime_ms = policy.downtime_limit_ms
        self.throttle_from: int | None = None  # pass index where auto-converge was turned on

    def _throttle_ramping(self, passes: Sequence[PassRecord]) -> bool:
        """After auto-converge, QEMU starts throttling about two passes later and raises the
        vCPU throttle by ``cpu-throttle-increment`` every pass or two (every other pass here)
        up to ``max-cpu-throttle``: judging before the ramp ends would give up on a throttle
        that has not had its effect yet."""
        if self.throttle_from is None:
            return False
        since = passes[self.throttle_from:]
        pct = [p.throttle_pct for p in since]
        if pct and pct[-1] >= MAX_CPU_THROTTLE:
            return False
        # give it three passes to start, then hold as long as it keeps rising
        return len(since) < 3 or pct[-1] > pct[-3]

    def decide(self, passes: Sequence[PassRecord], t_rel: float) -> Decision | None:
        if self._throttle_ramping(passes):
            self.since = len(passes)  # the detector judges what the full throttle does
            return None
        reason = not_converging(passes, self.since, self.conv.window, self.conv.min_improvement,
                                self.downtime_ms)
        if reason is None:
            return None
        self.since = len(passes)
        at = passes[-1].pass_ if passes else None
        while self.action_index < len(self.conv.actions):
            action = self.conv.actions[self.action_index]
            if action == "raise_downtime":
                steps = [s for s in self.conv.downtime_steps_ms if s > self.downtime_ms]
                if steps:
                    old, self.downtime_ms = self.downtime_ms, steps[0]
                    return Decision(action, f"{reason}: downtime limit {old} -> {self.downtime_ms} ms",
                                    at, t_rel, {"downtime-limit": self.downtime_ms})
                self.action_index += 1
                continue
            self.action_index += 1
            if action == "auto_converge":
                self.throttle_from = len(passes)
                return Decision(action, f"{reason}: throttling the guest's vCPU (auto-converge "
                                f"from {self.conv.throttle_initial}%, +{self.conv.throttle_increment}%)",
                                at, t_rel, {"throttle-trigger-threshold": 50,
                                            "cpu-throttle-initial": self.conv.throttle_initial,
                                            "cpu-throttle-increment": self.conv.throttle_increment})
            if action == "postcopy":
                return Decision(action, f"{reason}: switching to post-copy", at, t_rel)
            return Decision("cancel", f"{reason}: the policy says cancel", at, t_rel)
        return Decision("cancel", f"{reason}: the policy has no action left", at, t_rel)


