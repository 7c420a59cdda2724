"""Progress lines on stderr (never on stdout, which holds results).

On a terminal a step that takes long shows it is alive: after two seconds without a new
line, the last line gets a running clock (``... 37 s``), rewritten twice a second, and
ended with the step's time when the next line, a result or the end of the command comes.
The first ``labctl up`` builds images for minutes; each of those steps is one such line.
Elsewhere (a pipe, a log file, CI) the lines are plain and only written once.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

#: a step is "long" (gets its running clock) after this many seconds
LONG_S = 2.0


class Progress:
    """Progress lines on stderr, stamped with the time since the command started."""

    def __init__(self, quiet: bool, stream: TextIO | None = None,
                 long_s: float = LONG_S) -> None:
        self.t0 = time.monotonic()
        self.long_s = long_s
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.live = not quiet and _is_terminal(self.stream)
        self._lock = threading.Lock()
        self._line: str | None = None  # the step shown last, its line not ended yet
        self._since = 0.0
        self._shown = False  # its clock is on the screen
        self._ticker: threading.Thread | None = None

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        line = f"[{time.monotonic() - self.t0:6.1f}s] {msg}"
        with self._lock:
            self._end_line()
            if not self.live:
                print(line, file=self.stream, flush=True)
                return
            self.stream.write(line)
            self.stream.flush()
            self._line, self._since, self._shown = line, time.monotonic(), False
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
                self._ticker.start()

    def end_line(self) -> None:
        """End the step's line (before a result is printed, and when the command ends)."""
        with self._lock:
            self._end_line()

    def _end_line(self) -> None:
        if self._line is None:
            return
        took = time.monotonic() - self._since
        self.stream.write(f"\r{self._line} ({took:.0f} s)\n" if self._shown else "\n")
        self.stream.flush()
        self._line = None

    def _tick(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                if self._line is None:
                    continue
                took = time.monotonic() - self._since
                if took >= self.long_s:
                    self.stream.write(f"\r{self._line} ... {took:.0f} s")
                    self.stream.flush()
                    self._shown = True


class EndsProgressLine:
    """stdout, ending the progress line on the same terminal before a result is written."""

    def __init__(self, stream: TextIO, progress: Progress) -> None:
        self._stream = stream
        self._progress = progress

    def write(self, text: str) -> int:
        if text:
            self._progress.end_line()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
