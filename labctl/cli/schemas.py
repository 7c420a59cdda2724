"""The JSON Schemas of what the command line prints with ``--json``.

Each such record is a typed message (its wire form is what is printed), so its schema is
derived from the message's annotations (:func:`labctl.core.wire.json_schema`) and written
next to labctl as ``<name>.schema.json``: the documented contract of that output. Which
records a command prints is the caller's to say (``records``: file name -> message type).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from labctl.core.wire import Message, json_schema

SUFFIX = ".schema.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def schema_text(cls: type[Message]) -> str:
    """The schema of message ``cls`` as written: sorted keys, indent 2, a final newline (so
    the same message always gives the same bytes)."""
    return json.dumps(json_schema(cls), indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path, records: dict[str, type[Message]]) -> list[Path]:
    """Write ``<name>.schema.json`` in ``directory`` (made if missing) for each record, each
    file replaced whole; returns the files in the order of ``records``. A name that is not a
    plain file name (``/``, a leading dot, empty) is a ValueError, before anything is
    written."""
    for name in records:
        if not _NAME_RE.match(name):
            raise ValueError(f"bad schema name {name!r} (letters, digits, _ . -, not first . -)")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, cls in records.items():
        path = directory / f"{name}{SUFFIX}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(schema_text(cls), encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written
