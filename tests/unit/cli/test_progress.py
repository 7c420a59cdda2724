"""Progress on a terminal: a long step's line gets a running clock and ends with the
step's time; results written meanwhile start on a line of their own. Off a terminal the
lines are plain."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from labctl.cli.progress import EndsProgressLine, Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the progress clock never showed"
        time.sleep(0.05)


def test_a_long_step_shows_its_clock_and_ends_with_its_time() -> None:
    tty = Tty()
    p = Progress(False, tty, long_s=0.0)
    p("building the storage image")
    _until(lambda: "building the storage image ... " in tty.getvalue())
    out = EndsProgressLine(io.StringIO(), p)
    out.write("lab up\n")  # a result: the step's line is ended first
    p("next step")
    p.end_line()
    text = tty.getvalue()
    first, second = text.split("\n")[:2]
    assert first.startswith("[") and first.endswith(" s)") and "\r" in first, text
    assert "building the storage image (" in first.rsplit("\r", 1)[1]
    assert second.endswith("next step"), text  # quick: no clock
    assert text.endswith("\n")


def test_off_a_terminal_each_line_is_written_once() -> None:
    log = io.StringIO()
    p = Progress(False, log, long_s=0.0)
    p("one")
    time.sleep(0.7)  # the clock would have ticked once on a terminal
    p("two")
    p.end_line()
    lines = log.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["one", "two"]
    assert "\r" not in log.getvalue()


def test_quiet_writes_nothing() -> None:
    tty = Tty()
    p = Progress(True, tty)
    p("one")
    p.end_line()
    assert tty.getvalue() == ""
