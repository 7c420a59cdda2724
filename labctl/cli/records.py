"""Which record each command prints with ``--json``: the list whose JSON Schemas ship with
labctl (``labctl/schemas/<name>.schema.json``, written by ``write_all``; a unit test keeps
them equal to the types, an end-to-end test validates real output against them)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Literal

from labctl.cli.labs import (
    ConsoleAnswer,
    ConsoleTail,
    Exported,
    LabList,
    LogLine,
    Validated,
    VmStopped,
)
from labctl.cli.main import ErrorRecord
from labctl.cli.schemas import SUFFIX, write_schemas
from labctl.cli.storage import NodeDomain, RescanLookup
from labctl.cli.wan import WanPing
from labctl.core.wire import Message
from labctl.datastores.chaincopy import ChainCopied
from labctl.datastores.filestores import FileDatastore, FilesListed, Imported
from labctl.datastores.protocol import HostCache
from labctl.datastores.service import Created, Deleted, Mapping, Resized, Restarted, Shown
from labctl.datastores.tables import RescanEvent
from labctl.hosts.protocol import VmStarted
from labctl.lab.clouds import Ran
from labctl.lab.crosssite import CrossSite
from labctl.lab.face import Down
from labctl.lab.replicate import Replication, ReplicationRow
from labctl.lab.status import LabStatus, VmState
from labctl.lab.vagrant import VagrantDown, VagrantUp
from labctl.lab.vms import Snapshotted
from labctl.migration.policy import Policy
from labctl.migration.records import MigrationRow
from labctl.migration.result import MigrationResult
from labctl.storage.protocol import FileDeleted, FileEntry, PortalState
from labctl.wan.protocol import WanShown

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

#: record name -> its message type; lists (``vm list``, ``datastore list``) print a JSON array
#: of that record
RECORDS: dict[str, type[Message]] = {
    "status": LabStatus,  # labctl status, labctl up
    "ls": LabList,
    "down": Down,
    "validate": Validated,
    "export": Exported,
    "vm": VmState,  # each element of labctl vm list
    "vm-start": VmStarted,
    "vm-stop": VmStopped,
    "vm-snapshot": Snapshotted,
    "vm-console": ConsoleAnswer,  # labctl vm console VM CMD
    "vm-console-tail": ConsoleTail,  # labctl vm console VM
    # each line of labctl logs --json and vm console --follow --json (JSON lines)
    "log-line": LogLine,
    "datastore": Mapping,  # each element of labctl datastore list of kind block
    # a file datastore: each element of datastore list of kind file; datastore create --kind
    # file, show and delete of one
    "file-datastore": FileDatastore,
    "datastore-files": FilesListed,
    "datastore-show": Shown,
    "datastore-create": Created,
    "datastore-delete": Deleted,
    "datastore-resize": Resized,
    "image-import": Imported,
    "image-clone": FileEntry,
    "image-delete": FileDeleted,
    "chain-copy": ChainCopied,
    "host-storage": HostCache,  # labctl host storage, host rescan
    "event": RescanEvent,  # each line of labctl events --json (JSON lines)
    "rescan-lookup": RescanLookup,
    "storage-resume": NodeDomain,
    "storage-restart": Restarted,
    "storage-portal": PortalState,
    "migrate": MigrationResult,  # labctl migrate, labctl migration show
    "migrate-site": CrossSite,  # labctl migrate VM --to-site SITE
    "replicate": Replication,  # labctl replicate, labctl replication show
    "vm-ssh": Ran,  # labctl vm ssh VM -- CMD
    "replication": ReplicationRow,  # each element of labctl replication list
    "migration": MigrationRow,  # each element of labctl migration list
    "policy": Policy,  # each element of labctl migration policies
    "wan": WanShown,  # each element of labctl wan show; labctl wan set
    "wan-ping": WanPing,
    "vagrant-up": VagrantUp,
    "vagrant-down": VagrantDown,
    "error": ErrorRecord,  # any command that fails, with --json
}


#: what each command prints with --json: (command, action) -> the records it may print
#: (one of them) and how: ``one`` JSON document, a JSON ``list`` of records, or JSON
#: ``lines`` (one record per line, for commands that follow a log). Any command that fails
#: prints an ``error`` record instead.
Shape = Literal["one", "list", "lines"]
COMMANDS: dict[tuple[str, str | None], tuple[tuple[str, ...], Shape]] = {
    ("up", None): (("status",), "one"),
    ("status", None): (("status",), "one"),
    ("ls", None): (("ls",), "one"),
    ("down", None): (("down",), "one"),
    ("validate", None): (("validate",), "one"),
    ("export", None): (("export",), "one"),
    ("logs", None): (("log-line",), "lines"),
    ("vm", "list"): (("vm",), "list"),
    ("vm", "start"): (("vm-start",), "one"),
    ("vm", "stop"): (("vm-stop",), "one"),
    ("vm", "snapshot"): (("vm-snapshot",), "one"),
    ("vm", "ssh"): (("vm-ssh",), "one"),
    # VM CMD: the guest's answer; VM: the last lines; VM --follow: each line as it comes
    ("vm", "console"): (("vm-console", "vm-console-tail", "log-line"), "one"),
    ("migrate", None): (("migrate", "migrate-site"), "one"),
    ("migration", "list"): (("migration",), "list"),
    ("migration", "show"): (("migrate",), "one"),
    ("migration", "policies"): (("policy",), "list"),
    ("replicate", None): (("replicate",), "one"),
    ("replication", "list"): (("replication",), "list"),
    ("replication", "show"): (("replicate",), "one"),
    ("replication", "approve"): (("replication",), "one"),
    ("datastore", "create"): (("datastore-create", "file-datastore"), "one"),
    ("datastore", "list"): (("datastore", "file-datastore"), "list"),
    ("datastore", "show"): (("datastore-show", "file-datastore"), "one"),
    ("datastore", "files"): (("datastore-files",), "one"),
    ("datastore", "delete"): (("datastore-delete", "file-datastore"), "one"),
    ("datastore", "resize"): (("datastore-resize",), "one"),
    ("host", "storage"): (("host-storage",), "one"),
    ("host", "rescan"): (("host-storage",), "one"),
    ("events", None): (("event",), "lines"),
    ("rescan", "lookup"): (("rescan-lookup",), "one"),
    ("storage", "restart"): (("storage-restart",), "one"),
    ("storage", "resume"): (("storage-resume",), "one"),
    ("storage", "portal"): (("storage-portal",), "one"),
    ("wan", "show"): (("wan",), "list"),
    ("wan", "set"): (("wan",), "one"),
    ("wan", "ping"): (("wan-ping",), "one"),
    ("vagrant", "up"): (("vagrant-up",), "one"),
    ("vagrant", "down"): (("vagrant-down",), "one"),
    ("image", "import"): (("image-import",), "one"),
    ("image", "clone"): (("image-clone",), "one"),
    ("image", "delete"): (("image-delete",), "one"),
    ("chain", "copy"): (("chain-copy",), "one"),
}


def check_output(argv: list[str], returncode: int, stdout: str) -> str:
    """Check what ``labctl ARGV`` printed on stdout with ``--json`` against the shipped
    schemas of the records that command prints (an ``error`` record when it failed);
    returns the name of the record the (last) document fits, raises ValueError naming
    what does not fit. For tests, and
    for anyone checking a script's expectations against a real run."""
    import jsonschema  # here: only a check needs it

    from labctl.cli.args import parser

    args = parser().parse_args(argv)
    action = getattr(args, "action", None)
    cmd = {"migrations": "migration", "replications": "replication"}.get(args.cmd, args.cmd)
    if returncode != 0:
        names: tuple[str, ...] = ("error",)
        shape: Shape = "one"
    elif (cmd, action) in COMMANDS:
        names, shape = COMMANDS[(cmd, action)]
        if getattr(args, "follow", False):  # a followed log is JSON lines, whatever it is
            shape = "lines"
    else:
        raise ValueError(f"labctl {cmd} {action or ''}: no record is declared for its --json")
    if shape == "lines":
        docs = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    else:
        doc = json.loads(stdout)
        docs = doc if shape == "list" and isinstance(doc, list) else [doc]
        if shape == "list" and not isinstance(doc, list):
            raise ValueError(f"labctl {cmd} {action or ''} --json: expected a JSON array")
    validators = {name: jsonschema.Draft202012Validator(_schema(name)) for name in names}
    matched = names[0]
    for i, doc in enumerate(docs):
        problems = []
        for name, validator in validators.items():
            error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
            if error is None:
                matched = name
                break
            problems.append(f"{name}: {'/'.join(map(str, error.absolute_path))}: {error.message}")
        else:
            raise ValueError(f"labctl {' '.join(argv)}: record {i} fits none of "
                             f"{', '.join(names)}: {'; '.join(problems)}")
    return matched


@functools.cache
def _schema(name: str) -> dict[str, Any]:
    """A shipped schema, read once per process (a test run checks thousands of outputs)."""
    return dict(json.loads((SCHEMA_DIR / f"{name}{SUFFIX}").read_text(encoding="utf-8")))


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    return write_schemas(directory, RECORDS)


if __name__ == "__main__":
    for path in write_all():
        print(path)
