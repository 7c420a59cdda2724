"""Migration policies: what a migration asks of QEMU (downtime limit, bandwidth, multifd,
post-copy, early or late storage preparation) and what it does when the migration does not
converge. Built-in policies by name, or a YAML file whose every error names its field."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from labctl.core import userfile
from labctl.core.errors import LabError, printable
from labctl.core.wire import Message
from labctl.migration.protocol import Capabilities, Parameters, StorageMode

UNLIMITED_BANDWIDTH = 100 << 30  # bytes/s: QEMU's default cap is 128 MiB/s, so say "none" loudly
ACTIONS = ("raise_downtime", "auto_converge", "postcopy", "cancel")


@dataclass(frozen=True)
class Convergence(Message):
    """What a policy does when the migration does not converge: how it tells, and the
    actions it takes in turn."""

    window: int = 3  # passes without a new low of remaining bytes -> not converging
    min_improvement: float = 0.1  # a new low must be this much (fraction) below the old one
    actions: tuple[str, ...] = ("raise_downtime", "cancel")
    downtime_steps_ms: tuple[int, ...] = (600, 1200, 2400)
    throttle_initial: int = 30
    throttle_increment: int = 20


@dataclass(frozen=True)
class Policy(Message):
    """A migration policy, as `labctl migration policies --json` lists it and as each
    migration stores it."""

    name: str
    downtime_limit_ms: int = 300
    max_bandwidth_mib_s: float | None = None  # None: no cap
    auto_converge: bool = False  # throttling armed from the start at QEMU's own threshold
    multifd_channels: int = 0  # 0: a single stream
    postcopy: bool = False  # post-copy allowed (capability set on both sides)
    storage: StorageMode = "early"  # destination storage preparation
    convergence: Convergence = field(default_factory=Convergence)
    stall_timeout_s: float = 5.0  # no bytes moved for this long -> cancel
    timeout_s: float = 180.0
    lease_s: float = 10.0

    def capabilities(self) -> Capabilities:
        ac = self.auto_converge or "auto_converge" in self.convergence.actions
        return {"events": True, "auto-converge": ac, "multifd": self.multifd_channels > 0,
                "postcopy-ram": self.postcopy,
                "pause-before-switchover": self.storage == "late"}

    def parameters(self) -> Parameters:
        bw = (UNLIMITED_BANDWIDTH if self.max_bandwidth_mib_s is None
              else int(self.max_bandwidth_mib_s * (1 << 20)))
        p: Parameters = {"downtime-limit": self.downtime_limit_ms, "max-bandwidth": bw}
        if self.multifd_channels > 0:
            p["multifd-channels"] = self.multifd_channels
        if "auto_converge" in self.convergence.actions and not self.auto_converge:
            # QEMU refuses capability changes while a migration runs: arm auto-converge now,
            # dormant (it only throttles a guest that dirties faster than the link carries)
            # until the policy's action lowers the threshold.
            p["throttle-trigger-threshold"] = 100
        return p


BUILTIN_POLICIES: dict[str, Policy] = {
    # 50 ms, not QEMU's 300: with an uncapped link QEMU's bandwidth estimate is high, so a
    # 300 ms limit lets it stop the guest with ~100 MiB still dirty (a ~100 ms final burst);
    # at 50 ms it does one more short pass first (bench/migration, "switchover levers")
    "default": Policy("default", downtime_limit_ms=50),
    "capped": Policy("capped", max_bandwidth_mib_s=50),
    "converge": Policy("converge", max_bandwidth_mib_s=50, convergence=Convergence(
        actions=("raise_downtime", "auto_converge", "cancel"))),
    "postcopy": Policy("postcopy", max_bandwidth_mib_s=50, postcopy=True,
                       convergence=Convergence(actions=("postcopy",))),
    "strict": Policy("strict", max_bandwidth_mib_s=50, convergence=Convergence(actions=("cancel",))),
    "multifd": Policy("multifd", multifd_channels=2),
    "late": Policy("late", storage="late"),
}


def _policy_error(source: str, path: str, problem: str) -> LabError:
    where = f"{printable(source)}: {path}: " if path else f"{printable(source)}: "
    return LabError(f"migration policy {where}{problem}", source=source, path=path)


def policy_from_dict(d: Any, source: str = "<policy>") -> Policy:
    """A Policy from its YAML/JSON form; every error names the field and the problem."""
    if not isinstance(d, dict):
        raise _policy_error(source, "", "must be a mapping")
    base_name = d.get("base", "default")
    if not isinstance(base_name, str) or base_name not in BUILTIN_POLICIES:
        raise _policy_error(source, "base", f"unknown policy {userfile.shown(base_name)} "
                            f"(built in: {', '.join(BUILTIN_POLICIES)})")
    base = BUILTIN_POLICIES[base_name]
    known = {"name", "base", "downtime_limit_ms", "max_bandwidth_mib_s", "auto_converge",
             "multifd_channels", "postcopy", "storage", "convergence", "stall_timeout_s",
             "timeout_s", "lease_s"}
    extra = sorted(set(d) - known, key=str)  # YAML keys may be numbers, even null
    if extra:
        raise _policy_error(source, str(extra[0]),
                            f"unknown field (known: {', '.join(sorted(known))})")

    def num(key: str, lo: float, hi: float, integer: bool = False, src: Mapping[str, object] = d,
            prefix: str = "") -> int | float:
        v = src[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
            raise _policy_error(source, prefix + key, f"must be {'an integer' if integer else 'a number'}")
        if not lo <= v <= hi:
            raise _policy_error(source, prefix + key, f"must be between {lo:g} and {hi:g}")
        return v

    kw: dict[str, Any] = {"name": str(d.get("name", Path(source).stem if source != "<policy>"
                                            else base.name))}
    if "downtime_limit_ms" in d:
        kw["downtime_limit_ms"] = num("downtime_limit_ms", 1, 600000, integer=True)
    if "max_bandwidth_mib_s" in d:
        kw["max_bandwidth_mib_s"] = (None if d["max_bandwidth_mib_s"] is None
                                     else num("max_bandwidth_mib_s", 0.1, 100000))
    for key in ("auto_converge", "postcopy"):
        if key in d:
            if not isinstance(d[key], bool):
                raise _policy_error(source, key, "must be true or false")
            kw[key] = d[key]
    if "multifd_channels" in d:
        kw["multifd_channels"] = num("multifd_channels", 0, 32, integer=True)
    if "storage" in d:
        if d["storage"] not in ("early", "late"):
            raise _policy_error(source, "storage", "must be 'early' or 'late'")
        kw["storage"] = d["storage"]
    for key, lo, hi in (("stall_timeout_s", 1, 600), ("timeout_s", 5, 3600), ("lease_s", 3, 600)):
        if key in d:
            kw[key] = float(num(key, lo, hi))
    conv = base.convergence
    if "convergence" in d:
        c = d["convergence"]
        if not isinstance(c, dict):
            raise _policy_error(source, "convergence", "must be a mapping")
        ck = {"window", "min_improvement", "actions", "downtime_steps_ms", "throttle_initial",
              "throttle_increment"}
        bad = sorted(set(c) - ck, key=str)
        if bad:
            raise _policy_error(source, f"convergence.{bad[0]}",
                                f"unknown field (known: {', '.join(sorted(ck))})")
        ckw: dict[str, Any] = {}
        if "window" in c:
            ckw["window"] = num("window", 1, 50, True, c, "convergence.")
        if "min_improvement" in c:
            ckw["min_improvement"] = float(num("min_improvement", 0, 0.99, False, c, "convergence."))
        for key in ("throttle_initial", "throttle_increment"):
            if key in c:
                ckw[key] = num(key, 1, 99, True, c, "convergence.")
        if "actions" in c:
            acts = c["actions"]
            if not isinstance(acts, list) or not all(isinstance(a, str) for a in acts):
                raise _policy_error(source, "convergence.actions", "must be a list of names")
            for i, a in enumerate(acts):
                if a not in ACTIONS:
                    raise _policy_error(source, f"convergence.actions[{i}]",
                                        f"unknown action {a!r} (one of {', '.join(ACTIONS)})")
            ckw["actions"] = tuple(acts)
        if "downtime_steps_ms" in c:
            steps = c["downtime_steps_ms"]
            if (not isinstance(steps, list) or not steps
                    or not all(isinstance(s, int) and 1 <= s <= 600000 for s in steps)):
                raise _policy_error(source, "convergence.downtime_steps_ms",
                                    "must be a non-empty list of milliseconds (1..600000)")
            ckw["downtime_steps_ms"] = tuple(steps)
        conv = replace(base.convergence, **ckw)
    pol = replace(base, convergence=conv, **kw)
    if "postcopy" in pol.convergence.actions and not pol.postcopy:
        raise _policy_error(source, "convergence.actions",
                            "'postcopy' needs 'postcopy: true' (QEMU needs the capability on both "
                            "sides before the migration starts)")
    return pol


def load_policy(spec: str | Policy | None) -> Policy:
    """A built-in policy by name, or a YAML file."""
    if spec is None:
        return BUILTIN_POLICIES["default"]
    if isinstance(spec, Policy):
        return spec
    if spec in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[spec]
    try:
        text = userfile.read_text(spec, "a migration policy file (YAML text)")
    except userfile.NoSuchFile:
        raise LabError(f"no migration policy {userfile.shown(spec)}: not a built-in policy "
                       f"({', '.join(BUILTIN_POLICIES)}) and no such file", policy=spec) from None
    except userfile.BadFile as exc:
        raise _policy_error(spec, "", str(exc)) from None
    # PyYAML only for a policy file: a built-in policy, as every migration names by
    # default, costs `labctl migrate` no YAML parser at start (bench/virsh-migrate)
    import yaml  # noqa: PLC0415

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or exc
        raise _policy_error(spec, "", f"invalid YAML: {where}{' '.join(str(problem).split())}"
                            ) from None
    except RecursionError:  # the YAML composer recurses once per level of nesting
        raise _policy_error(spec, "", userfile.nested_too_deep()) from None
    except ValueError as exc:  # a value YAML recognises but cannot build (2024-13-01)
        raise _policy_error(spec, "", f"invalid YAML: a value cannot be read "
                                      f"({str(exc).split(';')[0]})") from None
    shape = userfile.shape_problem(data)
    if shape is not None:
        raise _policy_error(spec, "", shape)
    return policy_from_dict(data, spec)


