"""Sizes as topology files and users write them (``256M``, ``2G``). Standard library only.

A size is a number of bytes, or a number with ``K``, ``M``, ``G`` or ``T``, always powers
of 1024: ``256M`` is 256 MiB. ``B``, ``KB``/``MB``/``GB``/``TB`` and ``KiB``/``MiB``/
``GiB``/``TiB`` are accepted as the same units, so ``256MB`` is 256 MiB too (memory and
disk sizes of a lab are read as QEMU reads ``-m 256M``, never as powers of 1000).
"""

from __future__ import annotations

import re

from labctl.core.userfile import shown

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

#: the largest size labctl takes (1024T): anything larger is a typo, and a lab's sizes go
#: into SQLite integers and QEMU's 64-bit ones
MAX_SIZE = 1 << 50

#: what to write instead of a refused size
SIZE_FORMS = ("use a number with K, M, G or T (powers of 1024, e.g. 256M, 2G; "
              "B/KB/MiB are accepted too)")

_SIZE_RE = re.compile(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([KMGT]?)(?:i?B)?\s*")


def bad_size(value: object) -> str:
    """The problem with a size that is not one: what it was and the forms accepted."""
    return f"bad size {shown(value)}: {SIZE_FORMS}"


def too_large(value: object) -> str:
    """The problem with a size larger than :data:`MAX_SIZE`."""
    return f"bad size {shown(value)}: more than {format_size(MAX_SIZE)}; {SIZE_FORMS}"


def parse_size(value: int | str) -> int:
    """``256M`` -> 268435456; ``256MB`` and ``256MiB`` too (powers of 1024); ``1.5K`` ->
    1536 (a fraction of a byte is dropped). A refused size (not one of these forms, or
    larger than :data:`MAX_SIZE`) raises ValueError naming the accepted forms."""
    if isinstance(value, int):
        if value > MAX_SIZE:
            raise ValueError(too_large(value))
        return value
    m = _SIZE_RE.fullmatch(value)
    if m is None:
        raise ValueError(bad_size(value))
    whole, frac, unit = m.group(1).lstrip("0"), (m.group(2) or "")[:20], _UNITS[m.group(3)]
    # exact integer arithmetic: a float would overflow on a long number and round others
    if len(whole) > len(str(MAX_SIZE)):
        raise ValueError(too_large(value))
    n = int(whole or "0") * unit + int(frac or "0") * unit // int("1" + "0" * len(frac))
    if n > MAX_SIZE:
        raise ValueError(too_large(value))
    return n


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def human_size(n: int) -> str:
    """``n`` bytes for people: 8.3 MiB, 196 KiB, 512 B (rounded; :func:`format_size` is exact)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n} B"
