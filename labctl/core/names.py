"""Every name labctl puts on a machine, in one place: ports, interface names and aliases,
namespaces, libvirt domains, MAC addresses, iSCSI names.

Standard library only: agents (on hosts and inside the storage VM) use it too.

IFNAMSIZ is 15, so links are ``lc<tag><role><index>``, where ``<tag>`` is four hex
digits derived from the lab's name and directory (:func:`lab_tag`); the identity that
teardown checks is the link's alias, ``labctl:<lab>:<role>:<name>``, never its name.
A host's network namespace is named ``labctl-<lab>-<host>`` and proves to be the lab's
by the alias of its ``lo``, ``labctl:<lab>:netns:<host>@<tag>`` (:func:`netns_mark`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

#: the QEMU system emulator labctl runs on hosts (``$LABCTL_QEMU`` overrides)
QEMU_BINARY = os.environ.get("LABCTL_QEMU", "qemu-system-x86_64")
HOST_AGENT_PORT = 7600
STORAGE_AGENT_PORT = 7700
#: a mobility agent's relay (mutual TLS, agents of other sites)
MOBILITY_RELAY_PORT = 7800

#: the server guest's base image on a file datastore (made from the server image when
#: missing): a server VM's disk is a linked clone of it
SERVER_BASE = "labctl-server.raw"
ISCSI_PORT = 3260
IQN_PREFIX = "iqn.2026-11.dev.labctl"
#: XML namespace of the ownership record in libvirt domain metadata
LIBVIRT_METADATA_NS = "https://labctl.invalid/xmlns/labctl/1"


#: a lab's name, as a topology file gives it (its schema's ``name``)
LAB_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,15}")
LAB_NAME_RULE = "lowercase letters, digits and '-', starting with a letter, at most 16 characters"


def lab_tag(lab: str, lab_path: Path) -> str:
    """Four hex digits that make one lab's interface names unique on this machine."""
    return hashlib.sha1(f"{lab}@{lab_path}".encode()).hexdigest()[:4]


def alias(lab: str, role: str, name: str) -> str:
    """The alias every link of a lab carries (what teardown checks)."""
    return f"labctl:{lab}:{role}:{name}"


def bridge(tag: str, site_index: int) -> str:
    return f"lc{tag}b{site_index}"


def veth(tag: str, host_index: int) -> str:
    return f"lc{tag}h{host_index}"


def tap(tag: str, node_index: int) -> str:
    return f"lc{tag}s{node_index}"


def wan_tap(tag: str, link_index: int, leg: int) -> str:
    """The tap of WAN router ``link_index``'s leg 0 or 1."""
    return f"lc{tag}w{link_index}{'ab'[leg]}"


def netns(lab: str, host: str) -> str:
    return f"labctl-{lab}-{host}"


def netns_mark(lab: str, host: str, tag: str) -> str:
    """The mark a host's network namespace carries (the alias of its ``lo``): what proves
    it is the lab's. Its name does not: it is the same for a lab of the same name under
    another home, whose ``tag`` (:func:`lab_tag`) differs."""
    return alias(lab, "netns", f"{host}@{tag}")


def domain(lab: str, node: str) -> str:
    return f"labctl-{lab}-{node}"


def mac(tag: str, role: str, index: int) -> str:
    """A locally administered MAC for a lab NIC (``role``: one letter, e.g. "s" storage)."""
    return f"52:54:{tag[:2]}:{tag[2:4]}:{ord(role):02x}:{index:02x}"


def host_iqn(lab: str, host: str) -> str:
    return f"{IQN_PREFIX}:{lab}.{host}"


def target_iqn(lab: str, node: str) -> str:
    return f"{IQN_PREFIX}:{lab}.{node}"


def portal(address: str) -> str:
    return f"{address}:{ISCSI_PORT}"

#: TCP buffer limits (min, default, max bytes) wherever a site talks across a WAN link (host
#: namespaces, storage nodes): without them one flow stays near 600 Mbit/s at 40 ms RTT
TCP_BUFFERS = "4096 131072 33554432"


#: the server image's disk (its root filesystem): the system's ~160 MiB and ~70 MiB free;
#: the smallest disk a server VM may have (``disk: {size: ...}``)
SERVER_IMAGE_BYTES = 256 << 20
#: a server VM's disk when its topology gives no size: room for the application's data
#: (the image's filesystem is grown to it at the first boot)
SERVER_DISK_BYTES = 512 << 20
