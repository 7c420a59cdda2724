"""Datastore IDs in the array's own form (NAA-6, as LIO presents a LUN). Standard library only."""

from __future__ import annotations

from labctl.core.errors import LabError

LIO_COMPANY_ID = 0x001405
"""LIO's default IEEE company ID (OpenFabrics), used until ``wwn/company_id`` says otherwise."""


def naa_from_unit_serial(unit_serial: str, company_id: int = LIO_COMPANY_ID) -> str:
    """The NAA-6 designator LIO derives for a LUN (VPD page 0x83), as 32 hex digits.

    LIO builds it from NAA type 6, the 24-bit company ID, then the *hex digits only*
    of the unit serial, 25 of them, filling the 16 bytes (kernel
    ``spc_gen_naa_6h_vendor_specific``). Missing digits stay zero.
    """
    if not 0 <= company_id < (1 << 24):
        raise ValueError(f"company id {company_id:#x} does not fit 24 bits")
    digits = "".join(c for c in unit_serial.lower() if c in "0123456789abcdef")[:25]
    return f"6{company_id:06x}{digits.ljust(25, '0')}"


def normal_naa(naa: str) -> str:
    """``naa.`` + lowercase hex digits, whichever form a tool printed."""
    return "naa." + naa.lower().removeprefix("naa.")


def normal_id(unit: str) -> str:
    """A datastore ID given by a user or a peer, checked: ``naa.`` + 16 or 32 lowercase hex."""
    if not isinstance(unit, str) or not unit:
        raise LabError(f"bad datastore ID {unit!r}", unit=unit)
    hexpart = unit.lower().removeprefix("naa.")
    if not all(c in "0123456789abcdef" for c in hexpart) or len(hexpart) not in (16, 32):
        raise LabError(f"bad datastore ID {unit!r} (want naa. and 16 or 32 hex digits)",
                       unit=unit)
    return "naa." + hexpart
