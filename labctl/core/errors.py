"""The one exception tree of labctl.

Every error carries a one-line ``message`` meant for the user and an
``evidence`` dict with what was observed (command, stderr, QMP exchange,
console tail, ...), so a failure can be diagnosed without re-running it.

    LabError
     ├─ TopologyError         a topology file is unreadable or invalid
     ├─ LabStateError         the lab is not in a state that allows the request
     ├─ MissingDependency     a tool or package labctl needs is not installed
     ├─ CommandFailed         a program labctl ran exited non-zero
     ├─ ProvisionError        building part of the lab failed
     │   ├─ ImageBuildError
     │   ├─ NetworkSetupError
     │   └─ StorageNodeError
     ├─ AgentError            talking to a host or storage agent failed
     │   ├─ AgentUnreachable
     │   ├─ AuthenticationFailed
     │   ├─ ProtocolError     a message did not match its typed contract
     │   └─ RemoteError       the agent ran the request and it failed there
     └─ VmError               a workload VM misbehaved (QEMU, QMP, console)
         └─ MigrationError    a live migration was refused, failed or was cancelled

An error raised by an agent arrives at the controller as its own class: a remote
``MigrationError`` is raised as ``RemoteMigrationError``, a subclass of both
:class:`RemoteError` and :class:`MigrationError` (see :func:`remote_error`), so
callers catch it by what went wrong; ``evidence["remote"]`` keeps the agent's evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class LabError(Exception):
    """Base of every labctl error."""

    def __init__(self, message: str, **evidence: Any) -> None:
        super().__init__(message)
        self.message = message
        self.evidence: dict[str, Any] = evidence

    def __str__(self) -> str:
        return self.message

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able form, used to carry the error across an agent RPC."""
        return {"type": type(self).__name__, "message": self.message, "data": _jsonable(self.evidence)}


class TopologyError(LabError):
    """A topology file cannot be used. ``path`` is the place in the file, e.g. ``hosts[1].name``.

    A file with several problems raises one error for all of them (:meth:`listing`):
    ``problems`` holds every ``(path, problem)``, the message one line ``file: path: problem``
    per problem (the first :data:`SHOWN_PROBLEMS`, then how many more), ``path`` and
    ``problem`` are the first one's.
    """

    #: problems the message lists: a file of 20000 unknown keys is not read line by line
    SHOWN_PROBLEMS = 20

    def __init__(self, file: str, path: str, problem: str, *,
                 more: Sequence[tuple[str, str]] = (), **evidence: Any) -> None:
        problems = [(path, problem), *more]
        lines = [_topology_line(file, p, q) for p, q in problems[:self.SHOWN_PROBLEMS]]
        if len(problems) > self.SHOWN_PROBLEMS:
            lines.append(f"{printable(file)}: and {len(problems) - self.SHOWN_PROBLEMS} more "
                         "problems")
        super().__init__("\n".join(lines),
                         file=file, path=path, problem=problem,
                         problems=[{"path": p, "problem": q} for p, q in problems], **evidence)
        self.file = file
        self.path = path
        self.problem = problem
        self.problems = problems

    @classmethod
    def listing(cls, file: str, problems: Sequence[tuple[str, str]],
                **evidence: Any) -> TopologyError:
        """One error listing every ``(path, problem)`` of ``file`` (at least one)."""
        (path, problem), *more = problems
        return cls(file, path, problem, more=more, **evidence)


def printable(text: str) -> str:
    """``text`` with every character that is not printable escaped as Python writes it
    (``a\\nb.yaml``): a file name with a newline stays on its error's one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _topology_line(file: str, path: str, problem: str) -> str:
    file = printable(file)
    return f"{file}: {path}: {problem}" if path else f"{file}: {problem}"


class LabStateError(LabError):
    """The request does not fit the lab's current state (not up, already up, VM not running...)."""


class MissingDependency(LabError):
    """A program or package labctl needs is missing."""


class CommandFailed(LabError):
    """A program exited non-zero. Keeps argv, return code and output."""

    def __init__(
        self, argv: list[str], returncode: int, stdout: str = "", stderr: str = "", what: str = ""
    ) -> None:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        detail = (": " + " | ".join(tail)) if tail else ""
        super().__init__(
            f"{what or argv[0]} failed (exit {returncode}){detail}",
            argv=argv,
            returncode=returncode,
            stdout=stdout[-4000:],
            stderr=stderr[-4000:],
        )
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class ProvisionError(LabError):
    """Building part of the lab failed."""


class ImageBuildError(ProvisionError):
    """An image (storage node root, test guest) could not be built."""


class NetworkSetupError(ProvisionError):
    """A namespace, bridge, veth or address could not be set up."""


class StorageNodeError(ProvisionError):
    """The storage node VM did not come up or its storage agent failed."""


class AgentError(LabError):
    """Talking to an agent failed."""


class AgentUnreachable(AgentError):
    """No answer from an agent within the time allowed."""


class AuthenticationFailed(AgentError):
    """The peer did not prove it knows the lab secret."""


class ProtocolError(AgentError):
    """A request or reply did not match its typed contract (unknown, missing or mistyped
    field); ``evidence`` names the message and the field."""


class RemoteError(AgentError):
    """The agent ran the request and it failed there; ``remote_type`` names the error on its side."""

    def __init__(self, message: str, remote_type: str, **evidence: Any) -> None:
        super().__init__(message, remote_type=remote_type, **evidence)
        self.remote_type = remote_type


class VmError(LabError):
    """A workload VM failed to start, stop, or answer."""


class MigrationError(VmError):
    """A live migration was refused, failed or was cancelled; the evidence keeps the QMP
    exchange, the last ``query-migrate`` and what was done to recover."""


#: error classes an agent may raise that arrive as themselves (their __init__ is LabError's)
_REMOTE_AS_ITSELF: dict[str, type[LabError]] = {
    c.__name__: c for c in (LabError, LabStateError, MissingDependency, ProvisionError,
                            ImageBuildError, NetworkSetupError, StorageNodeError, VmError,
                            MigrationError, ProtocolError)}
_remote_classes: dict[str, type[RemoteError]] = {}


def remote_error(message: str, remote_type: str, **evidence: Any) -> RemoteError:
    """The error to raise for a failure an agent reported as ``remote_type``: a RemoteError
    that is also an instance of that class when labctl knows it (``RemoteMigrationError``
    is a MigrationError), else a plain RemoteError."""
    base = _REMOTE_AS_ITSELF.get(remote_type)
    if base is None:
        return RemoteError(message, remote_type, **evidence)
    cls = _remote_classes.get(remote_type)
    if cls is None:
        cls = type(f"Remote{remote_type}", (RemoteError, base),
                   {"__doc__": f"A {remote_type} raised by an agent.",
                    "__module__": __name__})
        _remote_classes[remote_type] = cls
    return cls(message, remote_type, **evidence)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)
