"""The test guest's console protocol and boot parameters, in one place (``guest.c`` is the
other side). Standard library only.

Boot parameters (kernel command line): ``labctl.rate=<MiB/s>`` (dirty rate),
``labctl.wss=<MiB>`` (working set), ``labctl.hb_ms=<ms>`` (heartbeat period,
10..1000, default 100), ``labctl.vm=<name>``.

Lines the guest prints (each at column 0)::

    READY | HB <n> <disk> | DISK boot <c> | DISK none | DISK invalid
    DISK read <c> | DISK wrote <c> | DISK error <what> <errno> | DISK size <bytes>
    OK rate <n> | OK wss <n> | OK hb <n> | ERR <line>

``<disk>`` in a heartbeat is the last disk counter written (or found at boot), -1
without a disk. Once a second the guest writes its counter as a record to sector 0
of its disk: ``LABCTLDC`` + counter (u64 LE) + FNV-1a of the first 16 bytes (u64 LE).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_WSS_MIB = 64
DEFAULT_HEARTBEAT_MS = 100
HEARTBEAT_MS_MIN = 10
HEARTBEAT_MS_MAX = 1000
RECORD_MAGIC = b"LABCTLDC"

#: console commands the host agent passes on: command -> (argument count, answer prefix).
#: ``hb`` is left out: the controller reads a VM's period from its inventory (a period
#: changed behind its back would make the migration's heartbeat check wrong).
COMMANDS: dict[str, tuple[int, str]] = {
    "rate": (1, "OK rate"), "wss": (1, "OK wss"),
    "read": (0, "DISK read"), "sync": (0, "DISK wrote"), "size": (0, "DISK size"),
}
#: answers that mean the guest refused a command
ERROR_PREFIXES = ("ERR ", "DISK error")


def valid_heartbeat_ms(value: object) -> bool:
    """Whether ``value`` is a heartbeat period the guest accepts (an int in range)."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and HEARTBEAT_MS_MIN <= value <= HEARTBEAT_MS_MAX)


def boot_args(rate_mib_s: int = 0, wss_mib: int = DEFAULT_WSS_MIB, extra: Iterable[str] = ()
              ) -> str:
    """The kernel command line of the test guest."""
    if rate_mib_s < 0 or wss_mib < 1:
        raise ValueError(f"bad guest parameters rate={rate_mib_s} wss={wss_mib}")
    parts = ["console=ttyS0", "quiet", "cryptomgr.notests",
             f"labctl.rate={rate_mib_s}", f"labctl.wss={wss_mib}", *extra]
    return " ".join(parts)


def heartbeat_ms_of(append: str) -> int:
    """The heartbeat period a guest booted with ``append`` uses: its first ``labctl.hb_ms=N``
    when N is in range, else the default (as the guest itself decides)."""
    for word in append.split():
        key, _, value = word.partition("=")
        if key == "labctl.hb_ms":
            if value.isdigit() and valid_heartbeat_ms(int(value)):
                return int(value)
            return DEFAULT_HEARTBEAT_MS
    return DEFAULT_HEARTBEAT_MS


@dataclass(frozen=True)
class Beat:
    """One ``HB`` line: the beat counter and the disk counter (None: no disk)."""

    counter: int
    disk_counter: int | None


def parse_heartbeat(text: str) -> Beat | None:
    """``HB <n> <disk>`` -> Beat; anything else -> None."""
    parts = text.split()
    if len(parts) != 3 or parts[0] != "HB":
        return None
    try:
        counter, disk = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    return Beat(counter, disk if disk >= 0 else None)


def parse_disk_counter(text: str) -> int | None:
    """The counter of a ``DISK read|wrote|boot <c>`` line, else None."""
    parts = text.split()
    if len(parts) == 3 and parts[0] == "DISK" and parts[1] in ("read", "wrote", "boot") \
            and parts[2].isdigit():
        return int(parts[2])
    return None


def check_command(command: str) -> tuple[str, str]:
    """A console command, normalised, and the prefix of its answer; ValueError if the guest
    does not know it."""
    words = command.split() if isinstance(command, str) else []
    spec = COMMANDS.get(words[0]) if words else None
    if spec is None or len(words) != spec[0] + 1 or not all(w.isdigit() for w in words[1:]):
        raise ValueError(f"the test guest knows no command {command!r} (it knows: "
                         "rate <MiB/s>, wss <MiB>, read, sync, size)")
    return " ".join(words), spec[1]


def fnv1a(data: bytes) -> int:
    h = 1469598103934665603
    for b in data:
        h ^= b
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def decode_disk_record(sector: bytes) -> int | None:
    """The guest's disk counter from sector 0 (None: no valid record; 0: blank disk)."""
    if len(sector) < 24:
        return None
    if sector[:8] == RECORD_MAGIC:
        (counter,) = struct.unpack("<Q", sector[8:16])
        (csum,) = struct.unpack("<Q", sector[16:24])
        return int(counter) if fnv1a(sector[:16]) == csum else None
    return 0 if not any(sector[:24]) else None
