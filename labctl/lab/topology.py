"""Topology files: pure description of a lab, checked before anything is built.

``load(path)`` reads YAML, checks it against the JSON Schema shipped in the
package, then checks what a schema cannot (unique names, references, subnets,
capacities) and returns a frozen ``Topology``. Every problem is a
``TopologyError`` naming the file, the place in it (``hosts[1].name``) and
what is wrong.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

from labctl.core import names
from labctl.core.errors import TopologyError
from labctl.core.sizes import format_size, parse_size
from labctl.guest.protocol import DEFAULT_HEARTBEAT_MS

DEFAULT_NODE_CAPACITY = 4 << 30
DEFAULT_NODE_MEMORY = 256 << 20
DEFAULT_HOST_MEMORY = 2 << 30
DEFAULT_VM_MEMORY = 256 << 20
DEFAULT_WORKING_SET = 64 << 20


@dataclass(frozen=True)
class Site:
    name: str
    subnet: ipaddress.IPv4Network

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The controller's address on the site bridge."""
        return self.subnet.network_address + 1


@dataclass(frozen=True)
class StorageNode:
    name: str
    site: str
    address: ipaddress.IPv4Address
    capacity: int
    memory: int
    target_iqn: str


@dataclass(frozen=True)
class Host:
    name: str
    site: str
    address: ipaddress.IPv4Address
    memory: int
    initiator_iqn: str


@dataclass(frozen=True)
class Datastore:
    name: str
    node: str
    size: int
    hosts: tuple[str, ...]


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


_T = TypeVar("_T", Site, StorageNode, Host, Datastore, Vm)


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
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TopologyError(file, "", f"cannot read the file: {exc.strerror or exc}") from None
    return parse(text, file)


def parse(text: str, file: str = "<topology>") -> Topology:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TopologyError(file, where, f"invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise TopologyError(file, "", "the top level must be a mapping (name:, sites:, hosts: ...)")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), e.path))
    if errors:
        err = jsonschema.exceptions.best_match(errors) or errors[0]
        raise TopologyError(file, _path(list(err.absolute_path)), _schema_message(err))
    return _build(data, file)


def _schema_message(err: jsonschema.ValidationError) -> str:
    if err.validator == "pattern" and isinstance(err.instance, str):
        desc = err.schema.get("description") if isinstance(err.schema, dict) else None
        return f"{err.instance!r} is not valid" + (f": {desc}" if desc else "")
    if err.validator == "additionalProperties":
        return str(err.message).replace("Additional properties are not allowed", "unknown key")
    if err.validator == "oneOf" and isinstance(err.schema, dict) and err.schema.get("description"):
        return f"{err.instance!r} is not valid: {err.schema['description']}"
    if err.validator in ("minimum", "maximum", "type") and isinstance(err.schema, dict) \
            and err.schema.get("description"):
        return f"{err.message}: {err.schema['description']}"
    return str(err.message)


def _build(data: dict[str, Any], file: str) -> Topology:
    def fail(path: str, problem: str) -> TopologyError:
        return TopologyError(file, path, problem)

    def unique(kind: str, items: list[dict[str, Any]], seen: dict[str, str]) -> None:
        for i, item in enumerate(items):
            name = item["name"]
            if name in seen:
                raise fail(f"{kind}[{i}].name", f"duplicate name {name!r} (also {seen[name]})")
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

    sites: list[Site] = []
    for i, s in enumerate(raw_sites):
        try:
            net = ipaddress.IPv4Network(s["subnet"], strict=True)
        except ValueError as exc:
            raise fail(f"sites[{i}].subnet", f"{s['subnet']!r} is not a network: {exc}") from None
        if net.num_addresses < 16:
            raise fail(f"sites[{i}].subnet", f"{net} is too small (need at least a /28)")
        for j, other in enumerate(sites):
            if net.overlaps(other.subnet):
                raise fail(f"sites[{i}].subnet",
                           f"{net} overlaps {other.subnet} of sites[{j}] ({other.name})")
        sites.append(Site(s["name"], net))
    site_names = [s.name for s in sites]

    def site_of(kind: str, i: int, item: dict[str, Any]) -> Site:
        name = item.get("site")
        if name is None:
            if len(sites) > 1:
                raise fail(f"{kind}[{i}].site", "required when the lab has more than one site")
            return sites[0]
        if name not in site_names:
            raise fail(f"{kind}[{i}].site", f"unknown site {name!r} (sites: {', '.join(site_names)})")
        return sites[site_names.index(name)]

    used: dict[ipaddress.IPv4Address, str] = {}

    def address(kind: str, i: int, item: dict[str, Any], site: Site, start: int) -> ipaddress.IPv4Address:
        if "address" in item:
            addr = ipaddress.IPv4Address(item["address"])
            if addr not in site.subnet or addr in (site.subnet.network_address,
                                                   site.subnet.broadcast_address, site.gateway):
                raise fail(f"{kind}[{i}].address",
                           f"{addr} is not a usable address of {site.name}'s subnet {site.subnet} "
                           f"({site.gateway} is the controller's)")
        else:
            addr = site.subnet.network_address + start
            while addr in used:
                addr += 1
            if addr >= site.subnet.broadcast_address:
                raise fail(f"{kind}[{i}]", f"no free address left in {site.subnet}")
        if addr in used:
            raise fail(f"{kind}[{i}].address", f"{addr} is already used by {used[addr]}")
        used[addr] = f"{kind}[{i}]"
        return addr

    # explicit addresses first so automatic ones never take them
    for kind, items in (("storage_nodes", raw_nodes), ("hosts", raw_hosts)):
        for i, item in enumerate(items):
            if "address" in item:
                address(kind, i, item, site_of(kind, i, item), 0)

    def assigned(kind: str, i: int, item: dict[str, Any], site: Site, start: int) -> ipaddress.IPv4Address:
        if "address" in item:
            return ipaddress.IPv4Address(item["address"])
        return address(kind, i, item, site, start)

    nodes = []
    for i, n in enumerate(raw_nodes):
        site = site_of("storage_nodes", i, n)
        nodes.append(StorageNode(
            name=n["name"], site=site.name, address=assigned("storage_nodes", i, n, site, 2),
            capacity=parse_size(n.get("capacity", DEFAULT_NODE_CAPACITY)),
            memory=parse_size(n.get("memory", DEFAULT_NODE_MEMORY)),
            target_iqn=names.target_iqn(lab, n['name']),
        ))
    hosts = []
    for i, h in enumerate(raw_hosts):
        site = site_of("hosts", i, h)
        hosts.append(Host(
            name=h["name"], site=site.name, address=assigned("hosts", i, h, site, 11),
            memory=parse_size(h.get("memory", DEFAULT_HOST_MEMORY)),
            initiator_iqn=names.host_iqn(lab, h['name']),
        ))
    host_names = [h.name for h in hosts]
    node_names = [n.name for n in nodes]

    stores = []
    free = {n.name: n.capacity for n in nodes}
    for i, d in enumerate(raw_ds):
        node_name = d.get("node")
        if node_name is None:
            if len(nodes) != 1:
                raise fail(f"datastores[{i}].node",
                           "required unless the lab has exactly one storage node")
            node_name = nodes[0].name
        elif node_name not in node_names:
            raise fail(f"datastores[{i}].node", f"unknown storage node {node_name!r}"
                       f" (storage nodes: {', '.join(node_names) or 'none'})")
        size = parse_size(d["size"])
        if size < 1 << 20:
            raise fail(f"datastores[{i}].size", f"{d['size']!r} is too small (at least 1M)")
        if size > free[node_name]:
            node = nodes[node_names.index(node_name)]
            raise fail(f"datastores[{i}].size",
                       f"{format_size(size)} does not fit on storage node {node_name} "
                       f"(capacity {format_size(node.capacity)}, "
                       f"{format_size(free[node_name])} free)")
        free[node_name] -= size
        node_site = nodes[node_names.index(node_name)].site
        for j, h in enumerate(d["hosts"]):
            if h not in host_names:
                raise fail(f"datastores[{i}].hosts[{j}]",
                           f"unknown host {h!r} (hosts: {', '.join(host_names)})")
            if hosts[host_names.index(h)].site != node_site:
                raise fail(f"datastores[{i}].hosts[{j}]",
                           f"host {h} is not in site {node_site} of storage node {node_name}")
        if len(set(d["hosts"])) != len(d["hosts"]):
            raise fail(f"datastores[{i}].hosts", "a host is named twice")
        stores.append(Datastore(d["name"], node_name, size, tuple(d["hosts"])))
    ds_names = [d.name for d in stores]

    vms = []
    load_on: dict[str, int] = dict.fromkeys(host_names, 0)
    for i, v in enumerate(raw_vms):
        if v["host"] not in host_names:
            raise fail(f"vms[{i}].host", f"unknown host {v['host']!r} (hosts: {', '.join(host_names)})")
        ds = v.get("datastore")
        if ds is not None:
            if ds not in ds_names:
                raise fail(f"vms[{i}].datastore",
                           f"unknown datastore {ds!r} (datastores: {', '.join(ds_names) or 'none'})")
            if v["host"] not in stores[ds_names.index(ds)].hosts:
                raise fail(f"vms[{i}].datastore",
                           f"host {v['host']} does not share datastore {ds} "
                           f"(shared by {', '.join(stores[ds_names.index(ds)].hosts) or 'no host'})")
            if sum(1 for w in raw_vms if w.get("datastore") == ds) > 1:
                raise fail(f"vms[{i}].datastore",
                           f"datastore {ds} is already the disk of another VM (one VM per LUN)")
        memory = parse_size(v.get("memory", DEFAULT_VM_MEMORY))
        wss = parse_size(v.get("working_set", DEFAULT_WORKING_SET))
        if memory < 64 << 20:
            raise fail(f"vms[{i}].memory", "at least 64M")
        if wss > memory - (32 << 20):
            raise fail(f"vms[{i}].working_set",
                       f"{format_size(wss)} leaves too little of the VM's {format_size(memory)} memory")
        host = hosts[host_names.index(v["host"])]
        if v.get("autostart", True):
            load_on[host.name] += memory
            if load_on[host.name] > host.memory:
                raise fail(f"vms[{i}].memory",
                           f"host {host.name} offers {format_size(host.memory)} to VMs and its VMs "
                           f"would need {format_size(load_on[host.name])}")
        vms.append(Vm(v["name"], v["host"], ds, memory, int(v.get("vcpus", 1)),
                      float(v.get("dirty_rate", 0)), wss, bool(v.get("autostart", True)),
                      int(v.get("heartbeat_ms", DEFAULT_HEARTBEAT_MS))))

    return Topology(
        name=lab, source=file,
        digest=hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16],
        sites=tuple(sites), storage_nodes=tuple(nodes), hosts=tuple(hosts),
        datastores=tuple(stores), vms=tuple(vms), raw=data,
    )
