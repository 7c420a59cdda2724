"""Mutual TLS between two agents of one lab, on real sockets: each side shows a
certificate of the lab's CA and accepts only such a peer. A client without a certificate,
one of another lab, a self-made one, or a server of another lab is refused in the
handshake; keys are 0600 from the start and the CA's key is never handed out."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from labctl.core.errors import LabStateError
from labctl.core.tlsctx import client_context, server_context
from labctl.state.pki import Issued, LabPki


async def _exchange(server: Issued, client_ctx: ssl.SSLContext | None,
                    server_hostname: str = "127.0.0.1") -> bytes:
    """One round trip: the server answers b'ok:' + what it read; the client's result."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            data = await r.readline()
            w.write(b"ok:" + data)
            await w.drain()
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0,
                                     ssl=server_context(server.cert, server.key, server.ca))
    port = srv.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                             server_hostname=server_hostname if client_ctx
                                             else None)
        w.write(b"hello\n")
        await w.drain()
        got = await asyncio.wait_for(r.readline(), 10)
        w.close()
        return got
    finally:
        srv.close()
        await srv.wait_closed()


def _lab(tmp_path: Path, lab: str) -> tuple[Issued, Issued]:
    pki = LabPki(lab, tmp_path / lab / "pki")
    server = pki.issue("mobility-b", ["127.0.0.1"], tmp_path / lab / "b")
    client = pki.issue("mobility-a", ["10.0.0.1"], tmp_path / lab / "a")
    return server, client


def test_two_agents_of_one_lab_talk_and_keys_are_private(tmp_path: Path) -> None:
    server, client = _lab(tmp_path, "lab1")
    ctx = client_context(client.cert, client.key, client.ca)
    assert asyncio.run(_exchange(server, ctx)) == b"ok:hello\n"
    for key in (server.key, client.key, tmp_path / "lab1" / "pki" / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    handed = {p.name for p in (tmp_path / "lab1" / "a").iterdir()}
    assert handed == {"mobility-a.pem", "mobility-a.key", "ca.pem"}  # never the CA's key


def _refused(server: Issued, ctx: ssl.SSLContext | None, name: str = "127.0.0.1") -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        got = asyncio.run(_exchange(server, ctx, name))
        # TLS 1.3: a client certificate the server rejects may surface as an empty read
        if not got:
            raise ConnectionError("closed by the server")


def test_another_labs_agent_is_refused_both_ways(tmp_path: Path) -> None:
    server1, client1 = _lab(tmp_path, "lab1")
    server2, client2 = _lab(tmp_path, "lab2")
    # a client of lab2 at lab1's server
    _refused(server1, client_context(client2.cert, client2.key, client2.ca))
    # a client of lab1 trusting its CA, at lab2's server: the server's certificate fails
    _refused(server2, client_context(client1.cert, client1.key, client1.ca))


def test_a_client_without_a_certificate_or_with_a_self_made_one_is_refused(
        tmp_path: Path) -> None:
    server, _ = _lab(tmp_path, "lab1")
    plain = ssl.create_default_context(cafile=str(server.ca))  # trusts the lab, shows nothing
    _refused(server, plain)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mobility-a")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "self.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "self.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _refused(server, client_context(tmp_path / "self.pem", tmp_path / "self.key", server.ca))


def test_the_client_checks_the_servers_address(tmp_path: Path) -> None:
    server, client = _lab(tmp_path, "lab1")
    ctx = client_context(client.cert, client.key, client.ca)
    _refused(server, ctx, name="10.9.9.9")  # the certificate names 127.0.0.1 and mobility-b


def test_half_a_ca_and_bad_names_are_refused(tmp_path: Path) -> None:
    pki = LabPki("lab1", tmp_path / "pki")
    pki.ensure_ca()
    pki.ca_key.unlink()
    with pytest.raises(LabStateError, match="half a CA"):
        pki.issue("mobility-a", [], tmp_path / "out")
    with pytest.raises(LabStateError, match="bad agent name"):
        LabPki("lab1", tmp_path / "pki2").issue("../x", [], tmp_path / "out")
