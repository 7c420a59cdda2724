"""QEMU's own last error line reaches the message; a LUN that cannot be opened *for now* is
told apart from one that never will be; a portal that does not answer is waited for within a
budget."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from labctl.core.errors import LabError
from labctl.drivers.iscsi import wait_portal
from labctl.drivers.qemu import last_error_line, transient_open_failure

LOG = [
    "2026-12-01T11:02:03.123456Z qemu-system-x86_64: warning: host doesn't support requested "
    "feature",
    "2026-12-01T11:02:04.000001Z qemu-system-x86_64: -blockdev driver=iscsi,transport=tcp,"
    "portal=10.231.0.2:3260: iSCSI: Failed to connect to LUN : Can not reconnect right now",
    "",
]


def test_the_last_error_line_without_its_stamp() -> None:
    assert last_error_line(LOG) == (
        "qemu-system-x86_64: -blockdev driver=iscsi,transport=tcp,portal=10.231.0.2:3260: "
        "iSCSI: Failed to connect to LUN : Can not reconnect right now")
    assert last_error_line(["HB 1 2", ""]) is None


@pytest.mark.parametrize(("error", "transient"), [
    ("iSCSI: Failed to connect to LUN : Can not reconnect right now", True),
    ("iSCSI: Failed to connect to LUN : connect: No route to host", True),
    ("iSCSI: Failed to connect to LUN : iscsi_service failed with : Connection refused", True),
    ("iSCSI: Failed to connect to LUN : Login failed: Authorization failure", False),
    ("iSCSI: Failed to connect to LUN : LOGICAL_UNIT_NOT_SUPPORTED", False),
    ("Could not open 'x': No such file or directory", False),
    (None, False),
])
def test_transient_or_permanent(error: str | None, transient: bool) -> None:
    assert transient_open_failure(error) is transient


def test_wait_portal_answers_at_once_or_says_why_within_its_budget() -> None:
    async def go() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        assert await wait_portal(f"127.0.0.1:{port}", budget=2) < 1.0
        server.close()
        await server.wait_closed()
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(LabError, match=f"portal 127.0.0.1:{free} did not answer within 1 s"):
            await wait_portal(f"127.0.0.1:{free}", budget=1)
        assert 0.9 < time.monotonic() - t0 < 3.5

    asyncio.run(go())


def test_a_portal_without_its_port_is_tried_on_3260() -> None:
    """'10.0.0.2' is a valid portal: it went through int('10.0.0.2') as its port."""
    with pytest.raises(LabError, match=r"did not answer within 0.3 s: .*'127.0.0.1', 3260"):
        asyncio.run(wait_portal("127.0.0.1", budget=0.3))
