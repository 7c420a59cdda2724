# PYTHON_ARGCOMPLETE_OK
"""The labctl command line: parse (labctl/cli/args.py), run the command's module, and keep
the promises every command makes: results on stdout, progress on stderr; with ``--json``
stdout holds exactly one JSON document, a failure included (``{"error": {...}}``, exit 1);
an error is one line, never a traceback (an OSError no command put in its own words too:
``file: reason``, its traceback with -v); Ctrl-C ends a read-only command quietly (130);
a closed pipe (``| head``) ends it quietly (0)."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import sqlite3
import sys
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TextIO, cast

import argcomplete

from labctl.cli.args import HANDLERS, WAN_VALUE_OPTIONS, parser
from labctl.cli.progress import EndsProgressLine, Progress
from labctl.core.errors import LabError, printable
from labctl.core.paths import home
from labctl.core.wire import Json, Message

#: commands that only read: Ctrl-C ends them quietly
READ_ONLY = {"status", "ls", "logs", "events", "validate", "migration", "migrations",
             "replication", "replications"}


Runner = Callable[[argparse.Namespace, Progress], Coroutine[Any, Any, int]]


def main(argv: list[str] | None = None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        # a file name that is not UTF-8 (LABCTL_HOME, a topology's) goes out as its bytes, as
        # Python prints it in the C locale, instead of a UnicodeEncodeError in a UTF-8 one
        sys.stdout.reconfigure(errors="surrogateescape")
    grammar = parser()
    argcomplete.autocomplete(grammar)  # answers shell completion requests, else returns
    args = grammar.parse_args(_value_options_joined(sys.argv[1:] if argv is None else argv))
    progress = Progress(args.quiet)
    # the command's module, imported only now: `labctl --help` and a typo cost nothing more
    module = importlib.import_module(f"labctl.cli.{HANDLERS[args.cmd]}")
    run: Runner = module.run
    streams = sys.stdout, sys.stderr
    if progress.live:  # a step's running clock ends before anything else is written
        sys.stderr = cast("TextIO", EndsProgressLine(sys.stderr, progress))
        if _is_tty(sys.stdout):
            sys.stdout = cast("TextIO", EndsProgressLine(sys.stdout, progress))
    try:
        if args.site and args.cmd not in ("up", "ls", "validate", "demo") and \
                (args.cmd, getattr(args, "action", None)) != ("migration", "policies"):
            importlib.import_module("labctl.cli.site").check(args)
        import asyncio  # here, not at the top: --help and --version need no event loop

        return asyncio.run(run(args, progress))
    except LabError as exc:
        if args.json:
            _json_error(exc.message, type(exc).__name__, exc.evidence if args.verbose else None)
        # a topology file's problems come all at once, one line each
        for line in exc.message.splitlines():
            print(f"labctl: error: {line}", file=sys.stderr)
        if args.verbose and exc.evidence:
            print(json.dumps(exc.evidence, indent=2, default=str), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted(args, module)
    except BrokenPipeError:
        # the reader went away (| head): say nothing, and let no flush at exit complain
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except sqlite3.Error as exc:
        # the inventory refused a read or write that no code put in its own words (a full
        # disk above all: SQLite rolls the transaction back, so nothing is half-written)
        line = _sqlite_line(exc)
        if args.json:
            _json_error(line, type(exc).__name__,
                        {"traceback": traceback.format_exc()} if args.verbose else None)
        print(f"labctl: error: {line}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 1
    except OSError as exc:
        # a file or device of the user's that the code reading it did not put in its own
        # words (the place to fix): still one line, naming the file and the system's reason;
        # -v shows where it was raised
        line = _os_error_line(exc)
        if args.json:
            _json_error(line, type(exc).__name__,
                        {"traceback": traceback.format_exc()} if args.verbose else None)
        print(f"labctl: error: {line}" + ("" if args.verbose else " (-v shows where)"),
              file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 1
    finally:
        progress.end_line()
        if args.verbose:
            _point_at_logs(args)
        sys.stdout, sys.stderr = streams


def _point_at_logs(args: argparse.Namespace) -> None:
    """With -v: where the lab's logs are (on stderr, after the command's own output)."""
    if args.cmd in ("ls", "validate"):
        return
    from labctl.lab.face import Lab

    try:
        lab = Lab.find(args.lab)
    except LabError:
        return
    d = lab.dir.path
    logs = [(p.parent.name, "host agent", p) for p in sorted(d.glob("hosts/*/agent.log"))]
    logs += [(p.parent.name, "storage node console", p)
             for p in sorted(d.glob("storage/*/console.log"))]
    logs += [("rescan", f"rescan service {p.parent.name}", p)
             for p in sorted(d.glob("sites/*/rescan.log"))]
    logs += [(f"{p.parent.name}@{p.parents[2].name}", "VM console", p)
             for p in sorted(d.glob("hosts/*/vms/*/console.log"))]
    if not logs:
        return
    print(f"labctl: the logs of lab {lab.name} (labctl logs NAME [--follow]; VM consoles: "
          "labctl vm console VM --follow):", file=sys.stderr)
    for name, what, path in logs:
        print(f"  {name:14} {what:20} {path}", file=sys.stderr)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _value_options_joined(argv: list[str]) -> list[str]:
    """``--delay -3ms`` as ``--delay=-3ms``, so the value reaches its own check; nothing
    after ``--`` (another program's arguments, as in ``exec HOST -- CMD``) is touched."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return out + argv[i:]
        if argv[i] in WAN_VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") \
                and not argv[i + 1].startswith("--"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


@dataclass(frozen=True)
class ErrorInfo(Message):
    #: the error's class (``LabStateError``, ``MigrationError``, ...)
    type: str
    #: the one line labctl also prints on stderr
    message: str
    #: what was observed (only with -v)
    evidence: Json = None


@dataclass(frozen=True)
class ErrorRecord(Message):
    """What any command prints on stdout with --json when it fails."""

    error: ErrorInfo


def _json_error(message: str, kind: str, evidence: object | None) -> None:
    record = ErrorRecord(ErrorInfo(kind, message, evidence or None))
    print(json.dumps(record.to_wire(), indent=2, default=str))


def _sqlite_line(exc: sqlite3.Error) -> str:
    """The inventory's refusal in one line, with the cure when the disk is full."""
    text = str(exc) or type(exc).__name__
    if "full" in text:
        return (f"the lab's inventory cannot be written: {text} (free space under "
                f"LABCTL_HOME={home()}; the inventory is as it was before this write)")
    return f"the lab's inventory: {text}"


def _os_error_line(exc: OSError) -> str:
    """``/srv/lab.yaml: Permission denied``: the file(s) and the system's words."""
    files = [printable(str(f)) for f in (exc.filename, exc.filename2) if f is not None]
    return ": ".join([*files, exc.strerror or str(exc)])


def _interrupted(args: argparse.Namespace, module: object) -> int:
    if args.cmd in ("migrate", "replicate"):
        message = getattr(module, "interrupted_message", None)
        print(message() if callable(message) else f"labctl: {args.cmd} cancelled (Ctrl-C)",
              file=sys.stderr)
    elif args.cmd in READ_ONLY or getattr(args, "follow", False) or \
            getattr(args, "attach", False):
        print(file=sys.stderr)
    else:
        print("labctl: interrupted; 'labctl down' removes whatever the lab had created",
              file=sys.stderr)
    if args.json:
        _json_error("interrupted (Ctrl-C)", "KeyboardInterrupt", None)
    return 130


if __name__ == "__main__":
    sys.exit(main())
