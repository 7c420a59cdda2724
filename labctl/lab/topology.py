"""Topology files: pure description of a lab, checked before anything is built.

``load(path)`` reads YAML, checks it against the JSON Schema shipped in the
package, then checks what a schema cannot (unique names, references, subnets,
capacities) and returns a frozen ``Topology``. Every problem names the file, the
place in it (``hosts[1].name``) and what is wrong; one ``TopologyError`` lists all
of a file's problems (the semantic checks run once the schema accepts the file).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

from labctl.core import names, userfile
from labctl.core.errors import LabError, TopologyError
from labctl.core.names import SERVER_BASE, SERVER_DISK_BYTES, SERVER_IMAGE_BYTES
from labctl.core.paths import home
from labctl.core.sizes import MAX_SIZE, bad_size, format_size, parse_size
from labctl.guest.protocol import DEFAULT_HEARTBEAT_MS
from labctl.hosts.sshhosts import SshAccess, read_host_key
from labctl.replication import app
from labctl.wan.protocol import PARAM_WORDS, LinkParams, params_from

#: a server guest's heartbeat (its PID 1 prints one line per period: cheap at a second)
SERVER_HEARTBEAT_MS = 1000
DEFAULT_NODE_CAPACITY = 4 << 30
DEFAULT_NODE_MEMORY = 256 << 20
DEFAULT_HOST_MEMORY = 2 << 30
DEFAULT_VM_MEMORY = 256 << 20
DEFAULT_WORKING_SET = 64 << 20


@dataclass(frozen=True)
class Site:
    name: str
    subnet: ipaddress.IPv4Network
    #: who runs its VMs: ``labctl`` (host agents) or ``libvirt`` (a cloud of its own)
    provider: str = "labctl"
    #: a libvirt cloud's room: at most this many ``vms``, bytes of ``memory`` and of ``disk``
    #: (what it holds at once); a VM that does not fit is refused
    quota: dict[str, int] | None = None
    #: an existing bridge of this machine carrying the site's network (a Vagrant or hardware
    #: lab's): labctl attaches to it and neither makes nor removes it
    bridge: str | None = None
    #: the site's network is not labctl's: it was given (``bridge``), or its hosts are
    #: machines reached over SSH
    external: bool = False

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The controller's address on the site bridge."""
        return self.subnet.network_address + 1

    @property
    def api(self) -> ipaddress.IPv4Address | None:
        """A libvirt cloud's API endpoint: the address after the controller's (such a site
        has no labctl machines to take it)."""
        return self.subnet.network_address + 2 if self.provider == "libvirt" else None

    @property
    def api_name(self) -> str:
        """The name of a libvirt cloud's API endpoint (a namespace host of the site)."""
        return f"{self.name}-api"


@dataclass(frozen=True)
class StorageNode:
    name: str
    site: str
    address: ipaddress.IPv4Address
    capacity: int
    memory: int
    target_iqn: str
    #: a machine reached over SSH with LIO in its kernel (None: a VM of this machine's)
    ssh: SshAccess | None = None


@dataclass(frozen=True)
class Host:
    name: str
    site: str
    address: ipaddress.IPv4Address
    memory: int
    initiator_iqn: str
    #: a machine reached over SSH (None: a network namespace on this machine)
    ssh: SshAccess | None = None


@dataclass(frozen=True)
class Datastore:
    name: str
    node: str
    size: int
    hosts: tuple[str, ...]
    #: ``block`` (an iSCSI LUN) or ``file`` (a filesystem exported over NFS)
    kind: str = "block"


@dataclass(frozen=True)
class Vm:
    name: str
    host: str
    datastore: str | None
    memory: int
    vcpus: int
    dirty_rate: float
    working_set: int
    autostart: bool
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    #: on a file datastore: the image its linked clone is made on
    base: str | None = None
    #: ``test`` (the heartbeat guest) or ``server`` (Debian, SSH, an address of its own)
    guest: str = "test"
    address: ipaddress.IPv4Address | None = None
    #: a server guest's application, started at this rate (bytes/s) with the VM
    app_rate: float | None = None
    #: its linked clone's size (bytes) when larger than its base's (a server guest grows its
    #: filesystem to fill it at boot)
    disk_size: int | None = None


@dataclass(frozen=True)
class WanLink:
    """A WAN link between two sites: a router VM with a leg on each site's bridge, netem on
    each leg's egress."""

    name: str
    sites: tuple[str, str]
    params: LinkParams
    #: the router's address on each site's subnet (the highest free one), in ``sites`` order
    addresses: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]


@dataclass(frozen=True)
class MobilityAgent:
    """A site's mobility agent: a gateway namespace on the site's bridge, registered as a
    host of kind ``mobility``, the site's end of migrations to and from other sites."""

    name: str
    site: str
    #: its address on the site's subnet (below the WAN routers' at the top)
    address: ipaddress.IPv4Address


@dataclass(frozen=True)
class Topology:
    name: str
    source: str
    digest: str
    sites: tuple[Site, ...]
    storage_nodes: tuple[StorageNode, ...]
    hosts: tuple[Host, ...]
    datastores: tuple[Datastore, ...]
    vms: tuple[Vm, ...]
    wan: tuple[WanLink, ...] = ()
    mobility: tuple[MobilityAgent, ...] = ()
    raw: dict[str, Any] = field(compare=False, repr=False, default_factory=dict)

    def site(self, name: str) -> Site:
        return _by_name(self.sites, name, "site")

    def host(self, name: str) -> Host:
        return _by_name(self.hosts, name, "host")

    def storage_node(self, name: str) -> StorageNode:
        return _by_name(self.storage_nodes, name, "storage node")

    def datastore(self, name: str) -> Datastore:
        return _by_name(self.datastores, name, "datastore")

    def vm(self, name: str) -> Vm:
        return _by_name(self.vms, name, "VM")

    def wan_link(self, name: str) -> WanLink:
        return _by_name(self.wan, name, "WAN link")


_T = TypeVar("_T", Site, StorageNode, Host, Datastore, Vm, WanLink)
_D = TypeVar("_D")


def _by_name(items: tuple[_T, ...], name: str, kind: str) -> _T:
    for item in items:
        if item.name == name:
            return item
    known = ", ".join(i.name for i in items) or "none"
    raise KeyError(f"unknown {kind} {name!r} (known: {known})")


def schema() -> dict[str, Any]:
    text = resources.files("labctl.lab").joinpath("schema/topology.schema.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def _path(parts: list[str | int] | Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def load(path: str | Path) -> Topology:
    """The topology of the file at ``path``; a TopologyError when it cannot be read (also a
    directory, a binary file, one larger than 1 MiB) or is no valid topology."""
    file = str(path)
    try:
        text = userfile.read_text(path, "a topology file (YAML text)")
    except userfile.BadFile as exc:
        raise TopologyError(file, "", str(exc)) from None
    return parse(text, file)


def parse(text: str, file: str = "<topology>") -> Topology:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError(file, *_yaml_problem(exc, text)) from None
    except RecursionError:  # the composer recurses once per level of nesting
        raise TopologyError(file, "", userfile.nested_too_deep()) from None
    except ValueError as exc:  # a value YAML recognises but cannot build (2024-13-01)
        raise TopologyError(file, "", f"invalid YAML: a value cannot be read "
                                      f"({str(exc).split(';')[0]})") from None
    shape = userfile.shape_problem(data)
    if shape is not None:  # before the schema's validator walks it recursively
        raise TopologyError(file, "", shape)
    if not isinstance(data, dict):
        raise TopologyError(file, "", "the top level must be a mapping (name:, sites:, hosts: ...)")
    doc = schema()
    validator = jsonschema.Draft202012Validator(doc)
    problems = [(_path(list(err.absolute_path)), message, _path([*err.absolute_path, *at]))
                for err in validator.iter_errors(data)
                for message, at in _schema_messages(err, doc["$defs"]["size"])]
    if problems:
        # the semantic checks read the file as the schema shapes it: they wait for a clean one
        raise TopologyError.listing(file, _in_file_order(data, problems))
    return _build(data, file)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[str, str]:
    """Where in the file (``line 3, column 7``) and what, in one line, a YAML error is."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        return (f"line {line}, column {column}",
                f"invalid YAML: character {char!r} (#x{ord(char):04x}) is not allowed")
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return where, "invalid YAML: " + " ".join(str(problem).split())


def _in_file_order(data: dict[str, Any],
                   problems: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """Each ``(path, problem)`` once, in the order of the places in the file they are about
    (the third item: ``path`` or a place inside it, e.g. the unknown key itself)."""

    def position(path: str) -> tuple[int, ...]:
        node: Any = data
        out = []
        for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
            if index:
                out.append(int(index))
                node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
            elif isinstance(node, dict) and key in node:
                out.append(list(node).index(key))
                node = node[key]
            else:
                out.append(len(node) if isinstance(node, dict) else 0)
                node = None
        return tuple(out)

    ordered = sorted(problems, key=lambda p: position(p[2]))
    return list(dict.fromkeys((path, problem) for path, problem, _ in ordered))


def _schema_messages(err: jsonschema.ValidationError,
                     size: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The problems ``err`` stands for, each with the place inside ``err``'s it is about
    (``size``: the schema of a size, whose refusal names the forms accepted)."""
    if err.validator == "additionalProperties" and isinstance(err.instance, dict) \
            and isinstance(err.schema, dict):
        known = list(err.schema.get("properties", {}))
        return [(f"unknown key {userfile.shown(key)} ({_hint(key, known, 'keys')})",
                 [str(key)])
                for key in err.instance if key not in known]
    if err.validator == "required" and isinstance(err.instance, dict) \
            and isinstance(err.schema, dict):
        # a key taken for a typo of the missing one already says so
        known = list(err.schema.get("properties", {}))
        meant = {_nearest(key, known) for key in err.instance if key not in known}
        if any(err.message == f"{key!r} is a required property" for key in meant):
            return []
    if err.validator == "oneOf" and err.schema == size:
        return [(bad_size(err.instance), [])]
    return [(_schema_message(err), [])]


def _schema_message(err: jsonschema.ValidationError) -> str:
    value = userfile.shown(err.instance)
    if err.validator == "pattern" and isinstance(err.instance, str):
        desc = err.schema.get("description") if isinstance(err.schema, dict) else None
        return f"{value} is not valid" + (f": {desc}" if desc else "")
    if err.validator == "oneOf" and isinstance(err.schema, dict) and err.schema.get("description"):
        return f"{value} is not valid: {err.schema['description']}"
    # jsonschema's own message starts with the value in full, however long it is
    message = str(err.message).replace(repr(err.instance), value, 1)
    if err.validator in ("minimum", "maximum", "type") and isinstance(err.schema, dict) \
            and err.schema.get("description"):
        return f"{message}: {err.schema['description']}"
    return message


def _listed(names: list[str]) -> str:
    return ", ".join(dict.fromkeys(names)) or "none"


def _nearest(word: object, known: list[str]) -> str | None:
    """The known word ``word`` is most likely a typo of, if one is close enough."""
    found = difflib.get_close_matches(str(word), known, n=1)
    return found[0] if found else None


def _hint(word: object, known: list[str], plural: str) -> str:
    """``did you mean 'hosts'?`` when a known word is close, else the known ones."""
    near = _nearest(word, known)
    return f"did you mean {near!r}?" if near else f"{plural}: {_listed(known)}"


def _unknown(kind: str, name: str, known: list[str], plural: str) -> str:
    """``unknown host 'hots1' (did you mean 'host1'? hosts: host1, host2)``"""
    near = _nearest(name, known)
    return (f"unknown {kind} {name!r} (" + (f"did you mean {near!r}? " if near else "")
            + f"{plural}: {_listed(known)})")


#: the address of a machine whose address could not be worked out: it only ever appears in
#: a topology that is refused
_NOWHERE = ipaddress.IPv4Address(0)


def vagrant_dir(lab: str) -> Path:
    """Where ``labctl vagrant up`` keeps lab ``lab``'s Vagrant state (its key and its
    machines' pinned host keys: :func:`vagrant_key`, :func:`vagrant_host_key`)."""
    return home() / "vagrant" / lab


def machine_items(data: dict[str, Any]) -> list[Any]:
    """The storage nodes and hosts of a topology as YAML read it (what may be a machine
    with an ``ssh:`` block), each as written."""
    return [*(data.get("storage_nodes") or []), *(data.get("hosts") or [])]


def vagrant_key(lab: str) -> Path:
    """The lab's SSH key for root on its Vagrant machines (0600)."""
    return vagrant_dir(lab) / "id_ed25519"


def vagrant_host_key(lab: str, machine: str) -> Path:
    """The host key Vagrant machine ``machine`` printed on its console, pinned."""
    return vagrant_dir(lab) / "keys" / f"{machine}.pub"


def _ssh_access(raw: dict[str, Any] | str, base: Path, where: str,
                fail: Callable[[str, str], None], address: str, lab: str, name: str
                ) -> SshAccess | None:
    """A machine's ``ssh:`` block: the client key's path made absolute (relative to the
    topology file), the host key read (a key line or a file) and parsed. ``ssh: vagrant``
    is the machine ``labctl vagrant up`` made for this lab: its key and pinned host key
    from there (checked by ``check_machine``: ``vagrant up`` may not have run yet);
    ``ssh: {vagrant: true, agent: systemd}`` the same with its agent said."""
    if raw == "vagrant" or (isinstance(raw, dict) and raw.get("vagrant")):
        given = raw if isinstance(raw, dict) else {}
        try:
            host_key = read_host_key(str(vagrant_host_key(lab, name)), base)
        except ValueError:
            host_key = ""
        return SshAccess(address=address, key=str(vagrant_key(lab)), host_key=host_key,
                         vagrant=lab, agent=str(given.get("agent", "process")),
                         python=str(given.get("python", SshAccess.python)),
                         agent_port=int(given.get("agent_port", 0)))
    assert isinstance(raw, dict)
    try:
        host_key = read_host_key(str(raw["host_key"]), base)
    except ValueError as exc:
        fail(f"{where}.host_key", str(exc))
        return None
    access = SshAccess(
        address=str(raw.get("address", address)), user=str(raw.get("user", "root")),
        port=int(raw.get("port", 22)), key=str((base / str(raw["key"])).expanduser()),
        host_key=host_key, agent=str(raw.get("agent", "process")),
        python=str(raw.get("python", SshAccess.python)),
        agent_port=int(raw.get("agent_port", 0)))
    for field_, problem in access.problems():
        if field_ != "key":  # the key file is the machine's: checked by check_machine
            fail(f"{where}.{field_}", problem)
    return access


def _build(data: dict[str, Any], file: str) -> Topology:
    """The topology of a file the schema accepted, after every check a schema cannot make.
    Each problem is recorded and the checks go on (skipping those that need what was
    refused), so one ``TopologyError`` lists them all."""
    problems: list[tuple[str, str]] = []

    def fail(path: str, problem: str) -> None:
        problems.append((path, problem))

    def sized(path: str, value: int | str, instead: _D) -> int | _D:
        """``value`` in bytes; ``instead`` when it is refused (reported: larger than
        MAX_SIZE), standing in for it so that it causes no other problem."""
        try:
            return parse_size(value)
        except ValueError as exc:
            fail(path, str(exc))
            return instead

    def unique(kind: str, items: list[dict[str, Any]], seen: dict[str, str]) -> None:
        for i, item in enumerate(items):
            name = item["name"]
            if name in seen:
                fail(f"{kind}[{i}].name", f"duplicate name {name!r} (also {seen[name]})")
            else:
                seen[name] = f"{kind}[{i}]"

    lab = data["name"]
    raw_sites = data["sites"]
    raw_nodes = data.get("storage_nodes", [])
    raw_hosts = data["hosts"]
    raw_ds = data.get("datastores", [])
    raw_vms = data.get("vms", [])

    unique("sites", raw_sites, {})
    machines: dict[str, str] = {}
    unique("storage_nodes", raw_nodes, machines)
    unique("hosts", raw_hosts, machines)
    unique("datastores", raw_ds, {})
    unique("vms", raw_vms, {})
    unique("wan", data.get("wan", []), {})

    sites: list[Site] = []
    where_site: dict[str, str] = {}
    for i, s in enumerate(raw_sites):
        try:
            net = ipaddress.IPv4Network(s["subnet"], strict=True)
        except ValueError as exc:
            fail(f"sites[{i}].subnet", f"{s['subnet']!r} is not a network: {exc}")
            continue
        if net.num_addresses < 16:
            fail(f"sites[{i}].subnet", f"{net} is too small (need at least a /28)")
            continue
        for other in sites:
            if net.overlaps(other.subnet):
                fail(f"sites[{i}].subnet",
                     f"{net} overlaps {other.subnet} of {where_site[other.name]} ({other.name})")
                break
        quota: dict[str, int] | None = None
        if "quota" in s:
            if s.get("provider", "labctl") != "libvirt":
                fail(f"sites[{i}].quota", "only a libvirt cloud has a quota (provider: "
                                          "libvirt); a labctl site's room is its hosts'")
            quota = {k: sized(f"sites[{i}].quota.{k}", v, MAX_SIZE) if k != "vms" else int(v)
                     for k, v in s["quota"].items()}
        if "bridge" in s and s.get("provider", "labctl") != "labctl":
            fail(f"sites[{i}].bridge", "only a labctl site is given a bridge")
        ssh_here = any("ssh" in h and h.get("site", s["name"] if len(raw_sites) == 1 else None)
                       == s["name"] for h in [*raw_hosts, *raw_nodes])
        if s["name"] not in where_site:
            where_site[s["name"]] = f"sites[{i}]"
            sites.append(Site(s["name"], net, s.get("provider", "labctl"), quota,
                              s.get("bridge"), "bridge" in s or ssh_here))
    site_names = [s["name"] for s in raw_sites]

    def site_of(kind: str, i: int, item: dict[str, Any]) -> Site | None:
        """The item's site; None when it has none or its subnet was refused (reported)."""
        name = item.get("site")
        if name is None:
            if len(raw_sites) > 1:
                fail(f"{kind}[{i}].site", "required when the lab has more than one site")
                return None
            name = raw_sites[0]["name"]
        elif name not in site_names:
            fail(f"{kind}[{i}].site", _unknown("site", name, site_names, "sites"))
            return None
        site = next((site for site in sites if site.name == name), None)
        if site is not None and site.provider != "labctl":
            fail(f"{kind}[{i}].site", f"site {name}'s VMs are run by {site.provider}: it has "
                 "no labctl hosts or storage nodes")
            return None
        return site

    machine_kinds = (("storage_nodes", raw_nodes), ("hosts", raw_hosts))
    placed = {(kind, i): site_of(kind, i, item)
              for kind, items in machine_kinds for i, item in enumerate(items)}
    used: dict[ipaddress.IPv4Address, str] = {}
    for i, cloud in enumerate(sites):
        if cloud.api is not None:
            used[cloud.api] = f"sites[{i}]'s API endpoint"

    def address(kind: str, i: int, item: dict[str, Any], start: int) -> ipaddress.IPv4Address | None:
        site = placed[kind, i]
        if "address" in item:
            try:
                addr = ipaddress.IPv4Address(item["address"])
            except ValueError:
                fail(f"{kind}[{i}].address", f"{item['address']!r} is not an IPv4 address")
                return None
            if site is None:
                return None
            if addr not in site.subnet or addr in (site.subnet.network_address,
                                                   site.subnet.broadcast_address, site.gateway):
                fail(f"{kind}[{i}].address",
                     f"{addr} is not a usable address of {site.name}'s subnet {site.subnet} "
                     f"({site.gateway} is the controller's)")
                return None
        else:
            if site is None:
                return None
            addr = site.subnet.network_address + start
            while addr in used:
                addr += 1
            if addr >= site.subnet.broadcast_address:
                fail(f"{kind}[{i}]", f"no free address left in {site.subnet}")
                return None
        if addr in used:
            fail(f"{kind}[{i}].address", f"{addr} is already used by {used[addr]}")
            return None
        used[addr] = f"{kind}[{i}]"
        return addr

    # explicit addresses first so automatic ones never take them
    explicit = {(kind, i): address(kind, i, item, 0)
                for kind, items in machine_kinds for i, item in enumerate(items) if "address" in item}

    def assigned(kind: str, i: int, item: dict[str, Any], start: int) -> ipaddress.IPv4Address:
        addr = explicit[kind, i] if "address" in item else address(kind, i, item, start)
        return addr or _NOWHERE

    def site_name(kind: str, i: int) -> str:
        site = placed[kind, i]
        return site.name if site else ""

    nodes = []
    for i, n in enumerate(raw_nodes):
        addr = assigned("storage_nodes", i, n, 2)
        nodes.append(StorageNode(
            name=n["name"], site=site_name("storage_nodes", i),
            address=addr,
            capacity=sized(f"storage_nodes[{i}].capacity",
                           n.get("capacity", DEFAULT_NODE_CAPACITY), MAX_SIZE),
            memory=sized(f"storage_nodes[{i}].memory", n.get("memory", DEFAULT_NODE_MEMORY),
                         MAX_SIZE),
            target_iqn=names.target_iqn(lab, n['name']),
            ssh=_ssh_access(n["ssh"], Path(file).parent, f"storage_nodes[{i}].ssh", fail,
                            str(addr), lab, n["name"]) if "ssh" in n else None,
        ))
    hosts = []
    base = Path(file).parent
    for i, h in enumerate(raw_hosts):
        addr = assigned("hosts", i, h, 11)
        hosts.append(Host(
            name=h["name"], site=site_name("hosts", i), address=addr,
            memory=sized(f"hosts[{i}].memory", h.get("memory", DEFAULT_HOST_MEMORY), MAX_SIZE),
            initiator_iqn=names.host_iqn(lab, h['name']),
            ssh=_ssh_access(h["ssh"], base, f"hosts[{i}].ssh", fail, str(addr), lab,
                            h["name"]) if "ssh" in h else None,
        ))
    with_ssh = [f"hosts[{i}].ssh" for i, h in enumerate(hosts) if h.ssh] + [
        f"storage_nodes[{i}].ssh" for i, n in enumerate(nodes) if n.ssh]
    if with_ssh and (data.get("wan") or any("mobility" in s for s in raw_sites)):
        fail(with_ssh[0], "machines reached over SSH are not supported in a lab with WAN "
                          "links or mobility agents yet (their routes to other sites are set "
                          "in the hosts' namespaces)")
    for i, h in enumerate(hosts):
        if "ssh" not in raw_hosts[i] and any(s.name == h.site and s.external and not s.bridge
                                 for s in sites):
            fail(f"hosts[{i}]", f"site {h.site} is a network of machines reached over SSH "
                                "without a bridge here: give this host an ssh: block too, or "
                                "the site a bridge:")
    host_names = [h.name for h in hosts]
    node_names = [n.name for n in nodes]
    for i, n in enumerate(nodes):
        if n.ssh is None and any(s.name == n.site and s.external and not s.bridge
                                 for s in sites):
            fail(f"storage_nodes[{i}]", f"site {n.site}'s network is reached here only by a "
                 "route: a storage node VM needs its bridge (sites[].bridge), or give the "
                 "node an ssh: block (a machine with LIO)")

    stores = []
    free = {n.name: n.capacity for n in nodes}
    for i, d in enumerate(raw_ds):
        node_name = d.get("node")
        if node_name is None:
            if len(nodes) == 1:
                node_name = nodes[0].name
            else:
                fail(f"datastores[{i}].node", "required unless the lab has exactly one storage node")
        elif node_name not in node_names:
            fail(f"datastores[{i}].node",
                 _unknown("storage node", node_name, node_names, "storage nodes"))
            node_name = None
        node = nodes[node_names.index(node_name)] if node_name is not None else None
        size = sized(f"datastores[{i}].size", d["size"], None)
        if size is None:
            pass
        elif size < 1 << 20:
            fail(f"datastores[{i}].size", f"{d['size']!r} is too small (at least 1M)")
        elif size % 512:
            # the same rule as `datastore create`: a LUN is whole 512-byte sectors
            fail(f"datastores[{i}].size",
                 f"{d['size']!r} is not a multiple of 512 bytes ({size} bytes)")
        elif d.get("kind") == "file" and size < 64 << 20:
            fail(f"datastores[{i}].size",
                 f"{d['size']!r} is too small for a file datastore (at least 64M)")
        elif node is not None and size > free[node.name]:
            fail(f"datastores[{i}].size",
                 f"{format_size(size)} does not fit on storage node {node.name} "
                 f"(capacity {format_size(node.capacity)}, {format_size(free[node.name])} free)")
        elif node is not None:
            free[node.name] -= size
        for j, h in enumerate(d["hosts"]):
            if h not in host_names:
                fail(f"datastores[{i}].hosts[{j}]", _unknown("host", h, host_names, "hosts"))
            elif node is not None and node.site and hosts[host_names.index(h)].site \
                    and hosts[host_names.index(h)].site != node.site:
                fail(f"datastores[{i}].hosts[{j}]",
                     f"host {h} is not in site {node.site} of storage node {node.name}")
        if len(set(d["hosts"])) != len(d["hosts"]):
            fail(f"datastores[{i}].hosts", "a host is named twice")
        stores.append(Datastore(d["name"], node_name or "", size or 0, tuple(d["hosts"]),
                                d.get("kind", "block")))
    ds_names = [d.name for d in stores]

    vms = []
    load_on: dict[str, int] = dict.fromkeys(host_names, 0)
    disk_of: dict[str, str] = {}
    for i, v in enumerate(raw_vms):
        host = hosts[host_names.index(v["host"])] if v["host"] in host_names else None
        if host is None:
            fail(f"vms[{i}].host", _unknown("host", v["host"], host_names, "hosts"))
        ds = v.get("datastore")
        if ds is not None and "disk" in v:
            fail(f"vms[{i}]", "give either datastore (a LUN) or disk (a file datastore)")
        elif "disk" in v:
            ds = v["disk"]["datastore"]
            store = stores[ds_names.index(ds)] if ds in ds_names else None
            if store is None:
                fail(f"vms[{i}].disk.datastore", _unknown("datastore", ds, ds_names,
                                                          "datastores"))
            elif store.kind != "file":
                fail(f"vms[{i}].disk.datastore", f"datastore {ds} is a block datastore: "
                     "give it as the VM's datastore (its LUN is the disk)")
            elif host is not None and host.name not in store.hosts:
                fail(f"vms[{i}].disk.datastore",
                     f"host {host.name} does not share datastore {ds} "
                     f"(shared by {', '.join(store.hosts) or 'no host'})")
        elif ds is not None:
            if ds not in ds_names:
                fail(f"vms[{i}].datastore", _unknown("datastore", ds, ds_names, "datastores"))
            else:
                store = stores[ds_names.index(ds)]
                if store.kind == "file":
                    fail(f"vms[{i}].datastore",
                         f"datastore {ds} is a file datastore: give the VM "
                         f"disk: {{datastore: {ds}, base: IMAGE}} (a linked clone)")
                elif host is not None and host.name not in store.hosts:
                    fail(f"vms[{i}].datastore",
                         f"host {host.name} does not share datastore {ds} "
                         f"(shared by {', '.join(store.hosts) or 'no host'})")
                if ds in disk_of:
                    fail(f"vms[{i}].datastore",
                         f"datastore {ds} is already the disk of {disk_of[ds]} (one VM per LUN)")
                else:
                    disk_of[ds] = f"VM {v['name']} (vms[{i}])"
        if math.isnan(v.get("dirty_rate", 0)):  # the schema's bounds let NaN (.nan) through
            fail(f"vms[{i}].dirty_rate", "nan is not a number of MB/s (0..100000)")
        memory = sized(f"vms[{i}].memory", v.get("memory", DEFAULT_VM_MEMORY), None)
        wss = sized(f"vms[{i}].working_set", v.get("working_set", DEFAULT_WORKING_SET), None)
        if memory is None:
            pass
        elif memory < 64 << 20:
            fail(f"vms[{i}].memory", "at least 64M")
        elif wss is not None and wss > memory - (32 << 20):
            fail(f"vms[{i}].working_set",
                 f"{format_size(wss)} leaves too little of the VM's {format_size(memory)} memory")
        if memory is None:
            pass
        elif host is not None and v.get("autostart", True):
            if load_on[host.name] + memory > host.memory:
                fail(f"vms[{i}].memory",
                     f"host {host.name} offers {format_size(host.memory)} to VMs and its VMs "
                     f"would need {format_size(load_on[host.name] + memory)}")
            else:
                load_on[host.name] += memory
        guest = v.get("guest", "test")
        vm_addr = None
        if guest == "server":
            if "disk" not in v:
                fail(f"vms[{i}]", "a server guest boots a clone of the server image: give it "
                     f"disk: {{datastore: FILE_DATASTORE, base: {SERVER_BASE}}}")
            for knob in ("dirty_rate", "working_set"):
                if knob in v:
                    fail(f"vms[{i}].{knob}", "the test guest's knob: a server guest runs "
                         "its own programs")
            if host is not None and host.ssh is not None:
                fail(f"vms[{i}].guest", f"host {host.name} is reached over SSH: a server guest "
                     "runs on a namespace host (its files and its route are this machine's)")
            elif host is not None:
                placed["vms", i] = placed["hosts", host_names.index(host.name)]
                vm_addr = address("vms", i, v, 101)
        elif "address" in v:
            fail(f"vms[{i}].address", "only a server guest has an address of its own "
                 "(guest: server)")
        app_rate = None
        if "app" in v:
            try:
                app_rate = app.parse_rate(str(v["app"]))
            except argparse.ArgumentTypeError as exc:
                fail(f"vms[{i}].app", str(exc))
            if guest != "server":
                fail(f"vms[{i}].app", "only a server guest runs the application (guest: "
                     "server)")
        disk_size = None
        if "size" in v.get("disk", {}):
            disk_size = sized(f"vms[{i}].disk.size", v["disk"]["size"], None)
            least = SERVER_IMAGE_BYTES if v["disk"]["base"] == SERVER_BASE else 1 << 20
            if disk_size is not None and disk_size < least:
                fail(f"vms[{i}].disk.size", f"at least {format_size(least)} (the "
                     f"{'server image' if least > 1 << 20 else 'smallest clone'})")
        elif v.get("disk", {}).get("base") == SERVER_BASE:
            disk_size = SERVER_DISK_BYTES
        vms.append(Vm(v["name"], v["host"], ds, memory or 0, int(v.get("vcpus", 1)),
                      float(v.get("dirty_rate", 0)), wss or 0, bool(v.get("autostart", True)),
                      int(v.get("heartbeat_ms", SERVER_HEARTBEAT_MS if guest == "server"
                                else DEFAULT_HEARTBEAT_MS)),
                      v["disk"]["base"] if "disk" in v else None, guest, vm_addr, app_rate,
                      disk_size))

    links = []
    routers: dict[str, int] = {}  # site -> routers placed on it so far
    joined: dict[frozenset[str], str] = {}
    for i, w in enumerate(data.get("wan", [])):
        pair = list(w["sites"])
        bad = [j for j, name in enumerate(pair) if name not in site_names]
        for j in bad:
            fail(f"wan[{i}].sites[{j}]", _unknown("site", pair[j], site_names, "sites"))
        if pair[0] == pair[1]:
            fail(f"wan[{i}].sites", f"a WAN link joins two different sites, not {pair[0]} twice")
            continue
        if frozenset(pair) in joined:
            fail(f"wan[{i}].sites", f"{pair[0]} and {pair[1]} are already joined by "
                                    f"{joined[frozenset(pair)]}")
            continue
        joined[frozenset(pair)] = f"wan[{i}]"
        try:
            params = params_from({k: v for k, v in w.items() if k in PARAM_WORDS})
        except LabError as exc:
            where = str(exc.evidence.get("field") or "")
            fail(f"wan[{i}]{'.' + where if where else ''}",
                 exc.message.removeprefix(f"{where}: ") if where else exc.message)
            continue
        ends = [next((x for x in sites if x.name == name), None) for name in pair]
        if bad or None in ends:  # an unknown site, or one whose subnet was refused (reported)
            continue
        addrs = []
        for name, site in zip(pair, ends, strict=True):
            assert site is not None
            k = routers.get(name, 0)
            addr = site.subnet.broadcast_address - 1 - k
            routers[name] = k + 1
            if addr in used:
                fail(f"wan[{i}]", f"the router's address {addr} in {name} is taken by "
                                  f"{used[addr]}: leave the top of the subnet free")
            used[addr] = f"wan[{i}]"
            addrs.append(addr)
        links.append(WanLink(w["name"], (pair[0], pair[1]), params, (addrs[0], addrs[1])))

    agents = []
    for i, s in enumerate(raw_sites):
        name = s.get("mobility")
        site = next((x for x in sites if x.name == s["name"]), None)
        if name is None or site is None:
            continue
        if name in machines:
            fail(f"sites[{i}].mobility", f"{name!r} is already the name of {machines[name]}")
            continue
        machines[name] = f"sites[{i}].mobility"
        if not any(site.name in w.sites for w in links):
            fail(f"sites[{i}].mobility", f"site {site.name} has no WAN link: a mobility agent "
                                         "carries migrations to and from other sites over one")
            continue
        addr = site.subnet.broadcast_address - 1 - routers.get(site.name, 0)
        if addr in used:
            fail(f"sites[{i}].mobility", f"its address {addr} is taken by {used[addr]}: "
                                         "leave the top of the subnet free")
            continue
        used[addr] = f"sites[{i}].mobility"
        agents.append(MobilityAgent(name, site.name, addr))

    for i, cloud in enumerate(sites):
        if cloud.api is not None and cloud.api_name in machines:
            fail(f"sites[{i}].name", f"its API endpoint's name {cloud.api_name!r} is already "
                                     f"the name of {machines[cloud.api_name]}")
    if problems:
        raise TopologyError.listing(file, _in_file_order(data, [(*p, p[0]) for p in problems]))
    return Topology(
        name=lab, source=file,
        digest=hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16],
        sites=tuple(sites), storage_nodes=tuple(nodes), hosts=tuple(hosts),
        datastores=tuple(stores), vms=tuple(vms), wan=tuple(links), mobility=tuple(agents),
        raw=data,
    )
