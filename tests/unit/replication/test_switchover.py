"""The switchover criterion: read with its dimensions checked, evaluated over what a pass
saw with a clause-by-clause account, refused in one line naming the column when it makes
no sense, and never handed to Python's eval."""

from __future__ import annotations

import math
import random

import pytest

from labctl.replication.switchover import (
    DEFAULT_WHEN,
    PassView,
    SwitchoverError,
    parse,
    policy_from,
    predicted_outage,
)

MIB = 1 << 20


def _view(**kw: float) -> PassView:
    base: dict[str, float] = dict(passes=3, remaining=40 * MIB, dirty_rate=2e6,
                                  link_rate=12.5e6, last_pass=4.0, elapsed=30.0)
    base.update(kw)
    base.setdefault("predicted_outage",
                    predicted_outage(base["remaining"], base["link_rate"], 0.5))
    return PassView(passes=int(base.pop("passes")), **base)


def test_the_default_criterion_holds_once_the_final_pass_fits_the_outage() -> None:
    c = parse(DEFAULT_WHEN)
    slow = c.over(_view(remaining=100 * MIB))  # 100 MiB at 100 Mbit/s: 8.9 s
    assert not slow.holds
    assert [(x.text, x.holds) for x in slow.clauses] == [("predicted_outage <= 2s", False),
                                                         ("passes >= 2", True)]
    assert slow.why() == ("predicted_outage <= 2s: 8.89 s vs 2.00 s: no; "
                          "passes >= 2: 3 vs 2: yes")
    small = c.over(_view(remaining=10 * MIB))
    assert small.holds and all(x.holds for x in small.clauses)
    assert not c.over(_view(remaining=0, passes=1)).holds  # one pass is never enough here


@pytest.mark.parametrize(("text", "holds"), [
    ("dirty_rate < 50% * link_rate", True),  # 16 Mbit/s against 50
    ("dirty_rate / link_rate < 0.1", False),  # 0.16
    ("remaining <= 40MiB and remaining > 40M - 1B", True),
    ("remaining < 41943040B or elapsed > 1h", False),
    ("not (last_pass > 5s) and -elapsed < 0min", True),
    ("predicted_outage + 1000ms <= 5s", True),  # 3.855 + 1.0
    ("remaining / link_rate <= last_pass", True),  # bytes / rate is a time
    ("link_rate >= 100Mbit/s and link_rate < 12MiB/s", True),
    ("link_rate * 2s >= 25MB", True),
    ("passes != 3 or passes == 3", True),
])
def test_expressions_evaluate_as_arithmetic_says(text: str, holds: bool) -> None:
    assert parse(text).over(_view()).holds is holds


@pytest.mark.parametrize(("text", "problem"), [
    ("predicted_outage <= 100MiB", "column 18: 'predicted_outage' (seconds) compared with "
                                   "'100MiB' (bytes)"),
    ("passses >= 2", "unknown name 'passses' (did you mean 'passes'?"),
    ("remaining > 2Mib", "unknown unit 'Mib' (did you mean MiB?)"),
    ("remaining + 2s > 1", "'remaining' (bytes) + '2s' (seconds)"),
    ("passes", "is a plain number, not a condition"),
    ("passes >= 2 and", "expected a name, a number or '(', got 'the end'"),
    ("(passes >= 1", "a '(' at column 1 is not closed"),
    ("passes >= 1 and remaining", "'and' joins conditions, but 'remaining' is bytes"),
    ("(passes > 1) + 1 > 0", "is a condition: no arithmetic on it"),
    ("__import__('os').system('x')", "is no part of a criterion"),
    ("passes >= 2; rm", "';' is no part of a criterion"),
    ("", "an empty criterion"),
])
def test_nonsense_is_refused_in_one_line(text: str, problem: str) -> None:
    with pytest.raises(SwitchoverError) as info:
        parse(text)
    assert problem in info.value.message
    assert "\n" not in info.value.message


def test_no_link_rate_yet_means_an_infinite_outage_not_a_crash() -> None:
    view = _view(link_rate=0.0, predicted_outage=predicted_outage(40 * MIB, 0.0, 0.5))
    verdict = parse("predicted_outage <= 2s or remaining / link_rate < 1s").over(view)
    assert not verdict.holds
    assert verdict.clauses[0].left == "infinite"
    assert parse("remaining / link_rate > 1h").over(view).holds
    assert math.isinf(view.predicted_outage)


def test_comparisons_agree_with_python_on_random_values() -> None:
    rng = random.Random(7)
    ops = {"<=": float.__le__, "<": float.__lt__, ">=": float.__ge__, ">": float.__gt__}
    for _ in range(300):
        view = _view(remaining=rng.uniform(0, 4096) * MIB, elapsed=rng.uniform(0, 7200))
        op = rng.choice(list(ops))
        limit_mib = rng.uniform(0, 4096)
        mins = rng.uniform(0, 120)
        text = f"remaining {op} {limit_mib:.3f}MiB and elapsed < {mins:.3f}min"
        want = ops[op](view.remaining, float(f"{limit_mib:.3f}") * MIB) and \
            view.elapsed < float(f"{mins:.3f}") * 60
        assert parse(text).over(view).holds is want, text


def test_a_policy_switches_gives_up_or_goes_on() -> None:
    policy = policy_from({"when": "predicted_outage <= 1s and passes >= 2",
                          "deadline": "10min", "max_passes": 5})
    assert policy.deadline_s == 600 and policy.max_passes == 5
    assert policy.decide(_view(remaining=2 * MIB))[0] == "switch"
    assert policy.decide(_view())[0] == "continue"
    assert policy.decide(_view(elapsed=600))[0] == "give_up"
    assert policy.decide(_view(passes=5))[0] == "give_up"
    # a criterion alone: the default limits
    assert policy_from("passes >= 3").decide(_view())[0] == "switch"


@pytest.mark.parametrize(("data", "problem"), [
    ({"whn": "passes > 1"}, "unknown key 'whn' (did you mean 'when'?)"),
    ({"deadline": "10MiB"}, "switchover.deadline: '10MiB' is bytes, not a time"),
    ({"deadline": "-5min"}, "is not a positive time"),
    ({"deadline": "passes"}, "must be a constant"),
    ({"max_passes": 0}, "max_passes: 0 is not a whole number from 1 to 1000"),
    ({"max_passes": True}, "max_passes: True is not a whole number"),
    ({"when": "passes >"}, "switchover.when: column 9"),
    (["passes > 1"], "a criterion or a mapping of when, deadline, max_passes"),
])
def test_a_bad_policy_names_its_key(data: object, problem: str) -> None:
    with pytest.raises(SwitchoverError) as info:
        policy_from(data)
    assert problem in info.value.message


def test_an_operator_s_approval_is_a_clause_like_the_others() -> None:
    c = parse("approved == 1 and passes >= 2")
    waiting = c.over(_view())
    assert not waiting.holds and waiting.why().startswith("approved == 1: 0 vs 1: no")
    assert c.over(_view(approved=1.0)).holds
    with pytest.raises(SwitchoverError):
        parse("approved >= 1s")  # a plain number, not a time


def test_free_space_is_a_clause_and_unknown_space_never_holds() -> None:
    c = parse("predicted_outage <= 2s or free_bytes < 64MiB")
    filling = c.over(_view(remaining=100 * MIB, free_bytes=float(40 * MIB)))
    assert filling.holds and "free_bytes < 64MiB: 40.0 MiB vs 64.0 MiB: yes" in filling.why()
    assert not c.over(_view(remaining=100 * MIB, free_bytes=float(65 * MIB))).holds
    # an agent that could not tell (the disk not mounted in its guest): no evidence, no cut
    unknown = c.over(_view(remaining=100 * MIB))
    assert not unknown.holds and unknown.clauses[1].holds is False
    with pytest.raises(SwitchoverError, match="free_bytes"):
        parse("free_bytes < 2s")  # bytes against a time
