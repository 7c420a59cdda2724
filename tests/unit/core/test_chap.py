"""CHAP credentials: derived per lab and host, never on QEMU's command line; LIO's ACLs get
exactly them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from labctl.core.chap import chap_for, initiator_secret
from labctl.drivers.lio import Lio
from labctl.drivers.qemu import CHAP_SECRET_ID, build_argv, disk_node
from labctl.hosts.protocol import IscsiDisk, VmSpec

H1, H2 = "iqn.2026-11.dev.labctl:l.h1", "iqn.2026-11.dev.labctl:l.h2"
T1, T2 = "iqn.2026-11.dev.labctl:l.s1", "iqn.2026-11.dev.labctl:l.s2"


def test_secrets_differ_per_host_target_direction_and_lab() -> None:
    lab = os.urandom(32)
    a, b = chap_for(lab, H1, T1), chap_for(lab, H2, T1)
    assert a == chap_for(lab, H1, T1)  # derived, the same wherever the lab secret is
    assert (a.user, a.target_user) == (H1, T1)
    secrets = {a.password, a.target_password, b.password, b.target_password,
               chap_for(lab, H1, T2).target_password, chap_for(os.urandom(32), H1, T1).password}
    assert len(secrets) == 6 and all(len(x) == 32 for x in secrets)
    # one initiator secret per host, good at every target
    assert chap_for(lab, H1, T2).password == a.password == initiator_secret(lab, H1)
    assert a.password not in repr(a) and a.target_password not in repr(a)
    assert a.libiscsi_env() == {
        "LIBISCSI_CHAP_USERNAME": H1, "LIBISCSI_CHAP_PASSWORD": a.password,
        "LIBISCSI_CHAP_TARGET_USERNAME": T1, "LIBISCSI_CHAP_TARGET_PASSWORD": a.target_password}
    with pytest.raises(ValueError, match="too short"):
        chap_for(b"short", H1, T1)


def _spec(disk: IscsiDisk) -> VmSpec:
    return VmSpec(name="vm1", memory_mib=256, vcpus=1, kernel=Path("/k/vmlinuz"),
                  initrd=Path("/k/initrd.img"), append="console=ttyS0", disk=disk)


def test_qemu_gets_a_secret_object_not_the_secret(tmp_path: Path) -> None:
    disk = IscsiDisk("10.0.0.2:3260", T1, 3, H1)
    cred = chap_for(os.urandom(32), H1, T1)
    argv = build_argv(_spec(disk), tmp_path, chap=cred)
    joined = " ".join(argv)
    assert cred.password not in joined and cred.target_password not in joined
    i = argv.index("-object")
    assert argv[i + 1] == (f"secret,id={CHAP_SECRET_ID},format=raw,"
                           f"file={tmp_path.absolute() / 'chap.secret'}")
    blockdev = argv[argv.index("-blockdev") + 1]
    assert f"user={H1},password-secret={CHAP_SECRET_ID}" in blockdev
    # the node a migration target adds later names the same object
    node = disk_node(disk, "disk0-file", cred)
    assert (node["user"], node["password-secret"]) == (H1, CHAP_SECRET_ID)
    assert "user" not in disk_node(disk, "disk0")  # without credentials: no CHAP
    assert "-object" not in build_argv(_spec(disk), tmp_path)


class _Acl:
    """The four CHAP attributes of an rtslib NodeACL, counting writes."""

    def __init__(self, wwn: str) -> None:
        self.node_wwn = wwn
        self.writes = 0
        self.__dict__.update(chap_userid="", chap_password="", chap_mutual_userid="",
                             chap_mutual_password="")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("chap_") and name in self.__dict__:
            self.__dict__["writes"] += 1
        super().__setattr__(name, value)


def test_lio_acl_gets_its_hosts_credentials_once() -> None:
    lab = os.urandom(32)
    lio = Lio("s1", T1, "10.0.0.2", chap=lambda iqn: chap_for(lab, iqn, T1))
    acl = _Acl(H1)
    lio._set_credentials(acl)
    cred = chap_for(lab, H1, T1)
    assert (acl.chap_userid, acl.chap_password, acl.chap_mutual_userid,
            acl.chap_mutual_password) == (H1, cred.password, T1, cred.target_password)
    assert acl.writes == 4
    lio._set_credentials(acl)  # unchanged: nothing rewritten under a live session
    assert acl.writes == 4
    bare = _Acl(H2)
    Lio("s1", T1, "10.0.0.2")._set_credentials(bare)  # no credentials: no CHAP
    assert bare.writes == 0 and bare.chap_userid == bare.chap_password == ""
