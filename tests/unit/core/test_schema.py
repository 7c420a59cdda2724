"""The JSON Schema of a typed message agrees with Message.from_wire: the wire form of real
messages (status, VM specs, migration replies, host cache entries, datastore records)
validates, and a wire form from_wire rejects (an extra key, a missing one, a wrong type, a
value outside a Literal) fails validation too."""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest

from labctl.core.errors import ProtocolError
from labctl.core.ids import normal_naa
from labctl.core.wire import Json, Message, WallTime, json_schema
from labctl.datastores import protocol as dp
from labctl.datastores import service as svc
from labctl.hosts import protocol as hp
from labctl.lab import status as ls
from labctl.migration import protocol as mp
from labctl.migration.convergence import Decision
from labctl.migration.result import (
    Beat,
    DiskCheck,
    HeartbeatCheck,
    MigrationResult,
    PrepareRecord,
    Recovery,
    SourceCheck,
    Switchover,
)

NAA = normal_naa("6001405" + "ab" * 12 + "c")
TARGET = "iqn.2003-01.org.linux-iscsi.stor1:datastores"
INITIATOR = "iqn.2024-01.dev.labctl:host1"

# --- real messages ---------------------------------------------------------------------------

STATUS = ls.LabStatus(
    lab="demo", state="up", accel="tcg", topology="/srv/demo.yaml",
    hosts=[ls.HostState("host1", "a", "10.0.0.11", INITIATOR, "lc-demo-host1", "up"),
           ls.HostState("host2", "a", "10.0.0.12", INITIATOR.replace("1", "2"), "lc-demo-host2",
                        "unreachable: connection refused")],
    storage_nodes=[ls.NodeState("stor1", "a", "10.0.0.21", TARGET, "lc-demo-stor1", "up",
                                "up 12 s")],
    datastores=[ls.DatastoreState("ds1", "stor1", NAA, 0, 64 << 20, "exported",
                                  ["host1", "host2"],
                                  {"host1": ls.Seen(NAA, 64 << 20), "host2": ls.Seen(None, None)})],
    vms=[ls.VmState("vm1", "host1", "ds1", 256 << 20, "running", 100, pid=4242,
                    heartbeat=hp.HeartbeatAge(17, 0.08), disk_counter=3,
                    qmp_check_socket="/run/lc/vm1/qmp-check.sock",
                    console_log="/run/lc/vm1/console.log"),
         ls.VmState("vm2", "host2", None, 128 << 20, "stopped", 250)],
    steps=[ls.Step("network", 0.412), ls.Step("hosts", 3.0)])

ISCSI = hp.IscsiDisk("10.0.0.21:3260", TARGET, 0, INITIATOR, naa=NAA)
FILE = hp.FileDisk(Path("/var/lib/labctl/vm1.img"), direct=False)
SPEC = hp.VmSpec("vm1", 256, 1, Path("/img/bzImage"), Path("/img/initrd"), "console=ttyS0",
                 disk=ISCSI)

CHECKS = mp.StorageChecks(datastore=mp.IscsiDatastoreCheck(NAA, 64 << 20),
                          read=mp.ReadCheck(512, 3))
PREPARED = mp.Prepared("tcp:10.0.0.12:49152", 5151, "early",
                       {"qemu_start_s": 0.31, "listen_s": 0.02}, CHECKS, "/run/lc/vm1")
STAMP = mp.HeartbeatStamp(17, 3, 1234.5)
PASS = mp.PassRecord(pass_=1, t_rel=0.5, status="active", dirty_sync_count=1,
                     transferred=1 << 20, remaining=None, total=256 << 20,
                     dirty_pages_rate=120.0, dirty_rate_bytes=0.0, expected_downtime_ms=None,
                     throttle_pct=0, mbps=812.5, prev_pass_s=0.25)
CANCELLED = mp.Cancelled("cancelled", "running", True, 0.21)

ENTRY = dp.CacheEntry(naa=NAA, datastore="ds1", portal="10.0.0.21:3260", target_iqn=TARGET,
                      lun=0, size_bytes=64 << 20, state="ok", seen_naa=NAA,
                      scanned_at=1700000000.5, scans=2, scsi_commands=9, error=None)
SCAN = dp.Scan(**vars(ENTRY) | {"state": "mismatch", "error": "the LUN reports another ID"},
               commands_this_scan=4)
MAPPING = svc.Mapping(name="ds1", naa=NAA, node="stor1", portal="10.0.0.21:3260",
                      target_iqn=TARGET, lun=0,
                      backing=svc.Backing("/srv/lab/stor1/ds1.img", "lc-ds1"),
                      unit_serial="ab" * 16, size_bytes=64 << 20, state="exported",
                      hosts=["host1", "host2"])

MESSAGES: dict[str, Message] = {
    "status": STATUS,
    "status, nothing yet": ls.LabStatus("empty", None, None, None),
    "spec, iscsi disk": SPEC,
    "spec, file disk": SPEC.replace(disk=FILE),
    "spec, no disk": SPEC.replace(disk=None, accel="kvm"),
    "start spec": hp.VmStartSpec("vm1", disk=FILE, accel="kvm", incoming="defer"),
    "vm list": hp.VmList([hp.VmStatus("vm1", "running", "running", 4242, None,
                                      hp.HeartbeatAge(17, 0.08), 3, None,
                                      "/run/lc/vm1/qmp-check.sock", "/run/lc/vm1/console.log")]),
    "prepared, early": PREPARED,
    "prepared, late": mp.Prepared(
        "tcp:10.0.0.12:49153", None, "late", {}, mp.StorageChecks(
            mp.FileDatastoreCheck("/var/lib/labctl/vm1.img", 1 << 30),
            died=mp.QemuDied(1, ["qemu: could not open disk"])), "/run/lc/vm1"),
    "source info": mp.SourceInfo(SPEC, "running", 64 << 20, STAMP, 4242, "running", False),
    "source status": mp.SourceStatus(
        "completed", 1234.0, [PASS], [mp.StatusChange(0.1, "active")],
        now=None, final={"status": "completed", "ram": {"transferred": 123, "mbps": 812.5}},
        stop_t=1236.0, stop_qemu_t=None, checkpoints={"src-downtime-start": 1236.001},
        heartbeat=STAMP, process="running", returncode=None, t=1236.5),
    "dest storage": mp.DestStorage({"late_storage_s": 0.4}, CHECKS),
    "dest finished": mp.DestFinished(STAMP, STAMP.replace(counter=20), 1236.2, None,
                                     {"dst-precopy-loadvm-completed": 1236.1}, "DISK read 3",
                                     "running", 5151, {"prepare_s": 0.5}, CHECKS),
    "dest aborted": mp.DestAborted("vm1", True),
    "dirty rate": mp.DirtyRate(64, "page-sampling", 1, 8192, 1.02),
    "cancelled": CANCELLED,
    "renewed": mp.Renewed(1250.0),
    "migration": MigrationResult(
        id=7, vm="vm1", source="host1", dest="host2", policy="default", storage="late",
        started_at=WallTime(1700000000.0), heartbeat_period_ms=100,
        dirty_rate_measured=mp.DirtyRate(None, None, None, None, 0.0), state="failed",
        prepare=PrepareRecord.of(PREPARED, 0.6), setup_ms=12, passes=1,
        switchover=Switchover(100.0, 410.0, None, 20.0, None, None, {"src-a": 0.0, "dst-b": None}),
        heartbeat=HeartbeatCheck(Beat(17, 3, -0.4), None, False), disk=DiskCheck(3, None, False),
        statuses=[mp.StatusChange(0.1, "failed")],
        final={"status": "failed", "error-desc": "connection reset"},
        pass_records=[PASS], decisions=[Decision("raise_downtime", "not converging", 1, 0.5,
                                                 {"downtime-limit": 500})],
        error="connection reset",
        recovery=Recovery(cancel=CANCELLED, source=SourceCheck("running", 17, 19, True))),
    "cache entry": ENTRY,
    "scan": SCAN,
    "host cache": dp.HostCache("host1", 40, [ENTRY, ENTRY.replace(state="new", seen_naa=None)]),
    "lookup, not shared": dp.Lookup("host2", NAA, False, None),
    "rescanned": dp.Rescanned([SCAN], [dp.Discovered("10.0.0.21:3260", TARGET, 0, 63 << 20, True),
                                       dp.Discovered("10.0.0.22:3260", error="no route")]),
    "datastore mapping": MAPPING,
    "datastore show": svc.Shown(**vars(MAPPING), seen_by={"host1": svc.Seen(NAA, 64 << 20, 1.5)},
                                vms=["vm1"], registry=svc.Registered(1700000000.0, "demo")),
    "datastore create": svc.Created(**vars(MAPPING), seen_by={"host1": SCAN}, seconds=2.5),
}


def _validator(cls: type[Message]) -> jsonschema.Draft202012Validator:
    schema = json_schema(cls)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _decodes(cls: type[Message], data: object) -> bool:
    try:
        cls.from_wire(data)
    except ProtocolError:
        return False
    return True


@pytest.mark.parametrize("msg", MESSAGES.values(), ids=MESSAGES.keys())
def test_real_messages_validate(msg: Message) -> None:
    wire = json.loads(json.dumps(msg.to_wire()))  # as a peer or a --json reader gets it
    assert type(msg).from_wire(wire) == msg
    errors = [e.message for e in _validator(type(msg)).iter_errors(wire)]
    assert errors == []


# --- mutated wire forms ----------------------------------------------------------------------

Where = tuple[str | int, ...]


def _set(data: Json, path: Where, value: Json) -> Json:
    out = copy.deepcopy(data)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _drop(data: Json, path: Where) -> Json:
    out = copy.deepcopy(data)
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


CASES: list[tuple[str, Message, Any]] = [
    ("extra key", STATUS, lambda w: _set(w, ("uptime",), 3)),
    ("extra key in a nested message", STATUS, lambda w: _set(w, ("vms", 0, "cpu"), 1)),
    ("extra key in a map's message", STATUS,
     lambda w: _set(w, ("datastores", 0, "seen_by", "host1", "at"), 1.0)),
    ("the Python name of a keyword field", PASS, lambda w: _set(_drop(w, ("pass",)), ("pass_",), 1)),
    ("missing required key", STATUS, lambda w: _drop(w, ("lab",))),
    ("missing nullable key", STATUS, lambda w: _drop(w, ("topology",))),
    ("missing key in a list's message", STATUS, lambda w: _drop(w, ("hosts", 1, "agent"))),
    ("missing key of a subclass", SCAN, lambda w: _drop(w, ("commands_this_scan",))),
    ("missing key in a union member", SPEC, lambda w: _drop(w, ("disk", "lun"))),
    ("string for int", STATUS, lambda w: _set(w, ("vms", 0, "pid"), "4242")),
    ("bool for int", STATUS, lambda w: _set(w, ("vms", 0, "memory_bytes"), True)),
    ("float for int", ENTRY, lambda w: _set(w, ("scans",), 2.5)),
    ("string for float", STATUS, lambda w: _set(w, ("steps", 0, "seconds"), "0.4")),
    ("bool for float", MESSAGES["renewed"], lambda w: _set(w, ("lease_until",), False)),
    ("int for string", STATUS, lambda w: _set(w, ("hosts", 0, "name"), 1)),
    ("null for string", ENTRY, lambda w: _set(w, ("portal",), None)),
    ("int for bool", MESSAGES["dest aborted"], lambda w: _set(w, ("removed",), 1)),
    ("object for list", STATUS, lambda w: _set(w, ("vms",), {})),
    ("wrong list item", STATUS, lambda w: _set(w, ("datastores", 0, "hosts", 1), 2)),
    ("list for map", STATUS, lambda w: _set(w, ("datastores", 0, "seen_by"), [])),
    ("wrong map value", PREPARED, lambda w: _set(w, ("timings", "listen_s"), "fast")),
    ("string for message", STATUS, lambda w: _set(w, ("vms", 0, "heartbeat"), "17")),
    ("empty path", SPEC, lambda w: _set(w, ("kernel",), "")),
    ("number for path", MESSAGES["spec, file disk"], lambda w: _set(w, ("disk", "path"), 1)),
    ("outside a Literal", ENTRY, lambda w: _set(w, ("state",), "gone")),
    ("outside a Literal", MESSAGES["start spec"], lambda w: _set(w, ("accel",), "xen")),
    ("outside a Literal", PREPARED, lambda w: _set(w, ("storage",), "middle")),
    ("outside a Literal", MESSAGES["migration"], lambda w: _set(w, ("storage",), "eventually")),
    ("union tag of neither member", SPEC, lambda w: _set(w, ("disk", "kind"), "nfs")),
    ("union tag of the other member", SPEC, lambda w: _set(w, ("disk", "kind"), "file")),
    ("union member's tag", PREPARED, lambda w: _set(w, ("checks", "datastore", "kind"), "file")),
    ("not an object", STATUS, lambda w: [w]),
]


@pytest.mark.parametrize(("what", "msg", "mutate"), CASES,
                         ids=[f"{c[0]} ({type(c[1]).__name__})" for c in CASES])
def test_mutated_wire_forms_fail(what: str, msg: Message, mutate: Any) -> None:
    cls = type(msg)
    wire = mutate(msg.to_wire())
    assert not _decodes(cls, wire), f"from_wire accepts {what}"
    assert not _validator(cls).is_valid(wire), f"the schema accepts {what}"


#: values put in place of every value of a wire form, one at a time
CANDIDATES: list[Json] = [None, True, 0, 3, 2.5, "", "x", [], [1], {}, {"k": "v"}]


def _variants(wire: Json) -> Iterator[tuple[str, Json]]:
    """Every wire form one change away from ``wire``: a key added or dropped in any object,
    any value (a list's items included) replaced by each candidate."""
    def walk(node: Json, path: Where) -> Iterator[tuple[str, Json]]:
        items: list[tuple[str | int, Json]] = []
        if isinstance(node, dict):
            yield f"{path} + zz", _set(wire, (*path, "zz"), 1)
            for key in node:
                yield f"{path} - {key}", _drop(wire, (*path, key))
            items = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))
        for key, value in items:
            for c in CANDIDATES:
                yield f"{(*path, key)} = {c!r}", _set(wire, (*path, key), copy.deepcopy(c))
            yield from walk(value, (*path, key))

    yield from walk(wire, ())


def _classes(tp: Any, found: set[type[Message]]) -> set[type[Message]]:
    if isinstance(tp, type) and issubclass(tp, Message):
        if tp not in found:
            found.add(tp)
            for hint in typing.get_type_hints(tp).values():
                _classes(hint, found)
    else:
        for arg in typing.get_args(tp):
            _classes(arg, found)
    return found


@pytest.mark.parametrize("msg", MESSAGES.values(), ids=MESSAGES.keys())
def test_schema_agrees_with_from_wire(msg: Message, monkeypatch: pytest.MonkeyPatch) -> None:
    """From every wire form one change away, what from_wire accepts validates and what it
    rejects does not. A message's own checks (``__post_init__``: a VM name's pattern, a
    memory range) are not the schema's business: they are left out here."""
    cls = type(msg)
    validator = _validator(cls)
    for c in _classes(cls, set()):
        if "__post_init__" in vars(c):
            monkeypatch.setattr(c, "__post_init__", lambda self: None)
    rejected = 0
    for what, data in _variants(msg.to_wire()):
        decodes, valid = _decodes(cls, data), validator.is_valid(data)
        assert valid == decodes, (f"{what}: from_wire {'accepts' if decodes else 'rejects'} it, "
                                  f"the schema {'accepts' if valid else 'rejects'} it")
        rejected += not valid
    assert rejected > 0


# --- the schema itself -----------------------------------------------------------------------

def test_fields_defaults_and_descriptions() -> None:
    schema = json_schema(hp.VmSpec)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "VmSpec"
    assert schema["description"] == "A workload VM, complete: what QEMU is started with."
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == ["name", "memory_mib", "vcpus", "kernel", "initrd", "append"]
    props = schema["properties"]
    assert props["memory_mib"] == {"type": "integer"}
    assert props["kernel"] == {"type": "string", "minLength": 1}
    assert props["machine"] == {"type": "string", "default": hp.DEFAULT_MACHINE}
    assert props["disk"] == {"anyOf": [{"$ref": "#/$defs/IscsiDisk"}, {"$ref": "#/$defs/FileDisk"},
                                       {"$ref": "#/$defs/NfsChainDisk"}, {"type": "null"}],
                             "default": None}
    assert sorted(schema["$defs"]) == ["FileDisk", "IscsiDisk", "NfsChainDisk", "NfsLayer", "Nic"]
    assert schema["$defs"]["NfsChainDisk"]["properties"]["kind"] == {
        "enum": ["nfs-chain"], "default": "nfs-chain"}
    assert schema["$defs"]["FileDisk"]["properties"]["kind"] == {"enum": ["file"], "default": "file"}
    assert schema["$defs"]["FileDisk"]["required"] == ["path"]
    # a dataclass without a docstring gets a made-up one: not a description
    assert "description" not in json_schema(hp.VmName)
    # a keyword field by its wire name; Json as anything; maps and lists
    passes = json_schema(mp.SourceStatus)["$defs"]["PassRecord"]
    assert "pass" in passes["properties"] and "pass_" not in passes["properties"]
    status = json_schema(mp.SourceStatus)["properties"]
    assert status["final"] == {}
    assert status["checkpoints"] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert status["passes"] == {"type": "array", "items": {"$ref": "#/$defs/PassRecord"}}
    assert json_schema(ls.LabStatus)["properties"]["vms"]["default"] == []


def test_deterministic_and_json() -> None:
    for cls in {type(m) for m in MESSAGES.values()}:
        schema = json_schema(cls)
        assert schema == json_schema(cls)
        text = json.dumps(schema, sort_keys=True)
        assert json.loads(text) == schema
        assert text == json.dumps(json_schema(cls), sort_keys=True)


@dataclass(frozen=True)
class Leaf(Message):
    value: int


@dataclass(frozen=True)
class Tree(Message):
    """A recursive message."""

    name: str
    children: list[Tree] = field(default_factory=list)
    leaves: dict[str, Leaf] = field(default_factory=dict)
    parent: Node | None = None


@dataclass(frozen=True)
class Node(Message):
    tree: Tree
    leaf: Leaf


def test_recursive_messages_one_definition_each() -> None:
    schema = json_schema(Tree)
    assert schema["properties"]["children"]["items"] == {"$ref": "#"}
    assert sorted(schema["$defs"]) == ["Leaf", "Node"]
    assert schema["$defs"]["Node"]["properties"]["tree"] == {"$ref": "#"}
    leaf = Leaf(1)
    msg = Tree("root", [Tree("a", leaves={"x": leaf})],
               parent=Node(Tree("up", [Tree("b")]), leaf))
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(msg.to_wire())
    bad = _set(msg.to_wire(), ("parent", "tree", "children", 0, "leaves"), {"y": {"value": "1"}})
    assert not validator.is_valid(bad) and not _decodes(Tree, bad)
    node = json_schema(Node)
    assert sorted(node["$defs"]) == ["Leaf", "Tree"]
    assert node["$defs"]["Tree"]["properties"]["parent"]["anyOf"][0] == {"$ref": "#"}


@dataclass(frozen=True)
class BothSeen(Message):
    lab: ls.Seen
    store: svc.Seen


def test_classes_sharing_a_name_are_told_apart() -> None:
    schema = json_schema(BothSeen)
    assert sorted(schema["$defs"]) == ["labctl.datastores.service.Seen", "labctl.lab.status.Seen"]
    assert schema["properties"]["store"] == {"$ref": "#/$defs/labctl.datastores.service.Seen"}
    validator = jsonschema.Draft202012Validator(schema)
    msg = BothSeen(ls.Seen(NAA, 1), svc.Seen(NAA, 1, 2.0))
    assert validator.is_valid(msg.to_wire())
    assert not validator.is_valid({"lab": msg.store.to_wire(), "store": msg.lab.to_wire()})


@dataclass(frozen=True)
class Unwired(Message):
    pair: tuple[int, int]


@dataclass(frozen=True)
class IntKeys(Message):
    counts: dict[int, int]


@dataclass(frozen=True)
class Wrapper(Message):
    inner: list[Unwired]


@pytest.mark.parametrize(("cls", "where"), [(Unwired, "Unwired.pair"), (IntKeys, "IntKeys.counts"),
                                            (Wrapper, "Unwired.pair")])
def test_a_type_without_json_form_is_refused(cls: type[Message], where: str) -> None:
    with pytest.raises(TypeError, match=where):
        json_schema(cls)


@dataclass(frozen=True)
class Tagged(Message):
    kind: Literal["a", "b"] | None
    number: int | str


def test_literal_and_union() -> None:
    props = json_schema(Tagged)["properties"]
    assert props["kind"] == {"anyOf": [{"enum": ["a", "b"]}, {"type": "null"}]}
    assert props["number"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
