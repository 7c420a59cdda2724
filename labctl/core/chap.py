"""iSCSI CHAP credentials of a lab: one pair of secrets per initiator and target.

Standard library only: the storage agent (inside the storage VM) and the host agents derive
the same credentials from the lab secret they already hold, so no CHAP secret ever crosses
the wire or a command line. Each secret is ``HMAC-SHA256(lab secret, label | ...)`` cut to
128 bits in hex (32 characters: within LIO's and every initiator's limits): the initiator's
from its IQN alone (one secret per lab and host, good at every target of the lab), the
target's from the target's and the initiator's IQN. The two of a pair differ (RFC 7143
12.1.3 forbids using one secret both ways), and every host's differ from every other host's.

* the **initiator** authenticates as its IQN with :attr:`Chap.password` (LIO's NodeACL
  ``auth/userid`` / ``auth/password``): a process that claims a host's IQN without the
  secret gets no session;
* the **target** authenticates back (mutual CHAP) as its IQN with
  :attr:`Chap.target_password` (``auth/mutual_userid`` / ``auth/mutual_password``). libiscsi
  checks it when asked to (the host agent's own probes and listings do); QEMU's iscsi
  driver passes initiator credentials only, so a VM's disk does not check the target.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

_LEN = 32  # hex characters of each secret


@dataclass(frozen=True)
class Chap:
    """The CHAP credentials of one initiator at one target."""

    user: str  # the initiator's IQN
    password: str = field(repr=False)
    target_user: str  # the target's IQN (mutual CHAP)
    target_password: str = field(repr=False)

    def libiscsi_env(self) -> dict[str, str]:
        """The environment libiscsi's tools (``iscsi-ls``, ``iscsi-inq``...) read their
        credentials from, mutual CHAP included: never their command line."""
        return {"LIBISCSI_CHAP_USERNAME": self.user, "LIBISCSI_CHAP_PASSWORD": self.password,
                "LIBISCSI_CHAP_TARGET_USERNAME": self.target_user,
                "LIBISCSI_CHAP_TARGET_PASSWORD": self.target_password}


def _secret(lab_secret: bytes, label: str, target: str, initiator: str) -> str:
    if len(lab_secret) < 16:
        raise ValueError("the lab secret is too short to derive CHAP secrets from")
    msg = b"\0".join((b"labctl-chap/1", label.encode(), target.lower().encode(),
                      initiator.lower().encode()))
    return hmac.new(lab_secret, msg, hashlib.sha256).hexdigest()[:_LEN]


def initiator_secret(lab_secret: bytes, initiator_iqn: str) -> str:
    """The CHAP secret ``initiator_iqn`` logs in with, at any target of the lab."""
    return _secret(lab_secret, "initiator", "", initiator_iqn)


def chap_for(lab_secret: bytes, initiator_iqn: str, target_iqn: str) -> Chap:
    """The credentials of ``initiator_iqn`` at ``target_iqn`` in the lab whose secret is
    ``lab_secret`` (the same on every machine that holds it)."""
    return Chap(user=initiator_iqn.lower(),
                password=initiator_secret(lab_secret, initiator_iqn),
                target_user=target_iqn.lower(),
                target_password=_secret(lab_secret, "target", target_iqn, initiator_iqn))
