"""Which record each command prints with ``--json``: the list whose JSON Schemas ship with
labctl (``labctl/schemas/<name>.schema.json``, written by ``write_all``; a unit test keeps
them equal to the types, an end-to-end test validates real output against them)."""

from __future__ import annotations

from pathlib import Path

from labctl.cli.labs import LabList
from labctl.cli.main import ErrorRecord
from labctl.cli.schemas import write_schemas
from labctl.core.wire import Message
from labctl.datastores.chaincopy import ChainCopied
from labctl.datastores.filestores import FileDatastore, FilesListed, Imported
from labctl.datastores.protocol import HostCache
from labctl.datastores.service import Created, Deleted, Mapping, Resized, Shown
from labctl.hosts.protocol import VmStarted
from labctl.lab.face import Down
from labctl.lab.status import LabStatus, VmState
from labctl.lab.vms import Snapshotted
from labctl.migration.result import MigrationResult
from labctl.storage.protocol import FileEntry
from labctl.wan.service import WanShown

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

#: record name -> its message type; lists (``vm list``, ``datastore list``) print a JSON array
#: of that record
RECORDS: dict[str, type[Message]] = {
    "status": LabStatus,  # labctl status, labctl up
    "ls": LabList,
    "down": Down,
    "vm": VmState,  # each element of labctl vm list
    "vm-start": VmStarted,
    "datastore": Mapping,  # each element of labctl datastore list of kind block
    # a file datastore: each element of datastore list of kind file; datastore create --kind
    # file, show and delete of one
    "file-datastore": FileDatastore,
    "datastore-files": FilesListed,
    "image-import": Imported,
    "image-clone": FileEntry,
    "chain-copy": ChainCopied,
    "vm-snapshot": Snapshotted,
    "datastore-show": Shown,
    "datastore-create": Created,
    "datastore-delete": Deleted,
    "datastore-resize": Resized,
    "host-storage": HostCache,
    "migrate": MigrationResult,
    "wan": WanShown,  # each element of labctl wan show; labctl wan set
    "error": ErrorRecord,  # any command that fails, with --json
}


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    return write_schemas(directory, RECORDS)


if __name__ == "__main__":
    for path in write_all():
        print(path)
