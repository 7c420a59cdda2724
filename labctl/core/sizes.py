"""Sizes as topology files and users write them (``256M``, ``2G``). Standard library only.

A size is a number of bytes, or a number with ``K``, ``M``, ``G`` or ``T``, always powers
of 1024: ``256M`` is 256 MiB. ``B``, ``KB``/``MB``/``GB``/``TB`` and ``KiB``/``MiB``/
``GiB``/``TiB`` are accepted as the same units, so ``256MB`` is 256 MiB too (memory and
disk sizes of a lab are read as QEMU reads ``-m 256M``, never as powers of 1000).
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

#: what to write instead of a refused size
SIZE_FORMS = ("use a number with K, M, G or T (powers of 1024, e.g. 256M, 2G; "
              "B/KB/MiB are accepted too)")


def bad_size(value: object) -> str:
    """The problem with a size that is not one: what it was and the forms accepted."""
    return f"bad size {value!r}: {SIZE_FORMS}"


def parse_size(value: int | str) -> int:
    """``256M`` -> 268435456; ``256MB`` and ``256MiB`` too (powers of 1024). A refused size
    raises ValueError naming the accepted forms (:func:`bad_size`)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", value)
    if m is None:
        raise ValueError(bad_size(value))
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)
