"""Files a user names on the command line (a topology, a migration policy): read as UTF-8
text of at most :data:`MAX_BYTES`, and what was parsed from them checked for the shape of a
small document before anything walks it recursively. Standard library only.

Each refusal is a :class:`BadFile` whose message says what is wrong in words, without the
file's name: the caller puts it in its own error, which names the file.
"""

from __future__ import annotations

from pathlib import Path

#: a topology or a policy is a few KiB: a larger file is the wrong one (or /dev/zero)
MAX_BYTES = 1 << 20
#: nesting deeper than this is no lab description (a topology needs 4 levels)
MAX_DEPTH = 32
#: values in one document, counted as parsed: YAML aliases make a short file a huge one
MAX_VALUES = 100_000


class BadFile(Exception):
    """What is wrong with a file (its message), in words."""


class NoSuchFile(BadFile):
    """There is no file of that name (a caller may take the name for something else)."""


def read_text(path: str | Path, kind: str) -> str:
    """The text of ``path``; :class:`BadFile` when it cannot be read, is larger than
    :data:`MAX_BYTES` or is not UTF-8 (``kind`` says what the file should be: ``a topology
    file``)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError as exc:
        raise NoSuchFile(f"cannot read the file: {exc.strerror}") from None
    except IsADirectoryError:
        raise BadFile(f"is a directory, not {kind}") from None
    except OSError as exc:
        raise BadFile(f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise BadFile(f"larger than {MAX_BYTES >> 20} MiB: not {kind}")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise BadFile(f"not text (byte {exc.start} is not UTF-8): not {kind}") from None


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` for a message, cut short when longer than ``limit``: a value read from
    a file can be a megabyte long, and the message is one line."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else \
        f"{len(value)} items" if isinstance(value, list | dict) else f"{len(text)} characters"
    return f"{text[:limit - 16]}... ({size})"


def nested_too_deep() -> str:
    """The problem with a document nested deeper than :data:`MAX_DEPTH`."""
    return f"nested more than {MAX_DEPTH} levels deep"


def shape_problem(data: object) -> str | None:
    """Why ``data`` (as parsed from a file) is no small document: nested deeper than
    :data:`MAX_DEPTH`, or more than :data:`MAX_VALUES` values; None when it is one. Walks
    without recursion, so a self-referring (YAML alias) document is refused as too deep."""
    todo: list[tuple[object, int]] = [(data, 0)]
    count = 0
    while todo:
        node, depth = todo.pop()
        count += 1
        if count > MAX_VALUES:
            return f"more than {MAX_VALUES} values (through YAML aliases?)"
        children: list[object]
        if isinstance(node, dict):
            children = [*node.keys(), *node.values()]
        elif isinstance(node, list | tuple):
            children = list(node)
        else:
            continue
        if children and depth >= MAX_DEPTH:
            return nested_too_deep()
        todo.extend((child, depth + 1) for child in children)
    return None
