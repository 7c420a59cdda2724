"""The storage agent's protocol: what the controller and the rescan service ask of a
storage node, and the storage events it publishes. Imports only ``labctl.core``.

Every method is answered by the storage agent inside the node VM
(:mod:`labctl.storage.agent`); the callers are the datastore service, the CLI, the lab
status and the rescan service. Events are published by the agent to every subscriber
(the rescan service) as ``Message.to_wire()`` and decoded with ``from_wire`` there.

A LUN's ``naa`` is its NAA designator as LIO builds it, written as every datastore ID is
in labctl: ``naa.`` and 32 lowercase hex digits.
"""

from __future__ import annotations

from dataclasses import dataclass

from labctl.core.names import STORAGE_AGENT_PORT
from labctl.core.wire import Empty, Message, Method

# --- the node's configuration ------------------------------------------------------------

@dataclass(frozen=True)
class NodeConfig(Message):
    """``config.json`` on the node's config disk: written by the controller
    (``labctl.storage.node``), read by the node's PID 1 (network) and the storage agent."""

    lab: str
    node: str
    #: the node's address with its prefix (``10.99.0.2/24``): the agent and the portal listen there
    address: str
    gateway: str | None
    mac: str
    #: the secret of the node's site, hex (the config disk is readable by the node only)
    secret: str
    target_iqn: str
    agent_port: int = STORAGE_AGENT_PORT
    #: the key the lab's storage nodes share for copies between them, hex: a peer that
    #: proves it may call ``file_send`` and nothing else (None: the site secret serves)
    peer_secret: str | None = None
    #: a machine's node (reached over SSH): the directory whose sparse files back its data
    #: disks on loop devices, made and grown by the agent (``disk_ensure``); None in a
    #: node VM, whose virtio disks libvirt attaches
    disk_dir: str | None = None
    #: what the names of the node's LIO backstores begin with (a datastore's name follows):
    #: a machine's LIO is the machine's, shared with another lab's node there ("" in a node
    #: VM, whose LIO is its own)
    backstore_prefix: str = ""

    @property
    def ip(self) -> str:
        return self.address.split("/", 1)[0]


# --- requests and replies ----------------------------------------------------------------

@dataclass(frozen=True)
class NodePing(Message):
    """Reply of ``ping``: cheap liveness, no LIO call."""

    node: str
    #: seconds since the node booted: a smaller value than last time means it restarted
    uptime_s: float
    #: the portal was taken down with ``portal_set`` (new logins are refused)
    portal_down: bool


@dataclass(frozen=True)
class LunInfo(Message):
    """One exported datastore as LIO has it now."""

    #: the datastore name (the iblock backstore's name)
    name: str
    #: the TPG LUN number; None while the backstore is not exported
    lun: int | None
    #: NAA designator: ``naa.`` and 32 hex digits
    naa: str
    #: the unit serial the NAA ID is derived from
    serial: str
    #: capacity of the backing device in bytes, as the node's kernel sees it now
    size_bytes: int
    #: the backing block device (``/dev/vdX``)
    device: str
    #: initiator IQNs that see the LUN (the ACLs mapping it), sorted
    initiators: list[str]


@dataclass(frozen=True)
class LunEnsured(LunInfo):
    """Reply of ``ensure_lun``: the LUN, and whether this call exported it."""

    created: bool


@dataclass(frozen=True)
class NodeStatus(Message):
    """Reply of ``status``: the node's whole LIO target."""

    node: str
    target_iqn: str
    #: ``ip:port`` of the node's iSCSI portal
    portal: str
    #: every iblock backstore, exported ones first by LUN number
    luns: list[LunInfo]
    #: initiator IQNs with a NodeACL, sorted
    acls: list[str]
    uptime_s: float


@dataclass(frozen=True)
class EnsureLun(Message):
    """Request of ``ensure_lun``: export a datastore (idempotent) to exactly ``initiators``."""

    name: str
    #: the virtio serial of the data disk backing it (how the agent finds the disk)
    disk_serial: str
    #: 32 hex digits; LIO's NAA ID is derived from it, so it fixes the datastore's ID
    unit_serial: str
    initiators: list[str]


@dataclass(frozen=True)
class SetInitiators(Message):
    """Request of ``set_initiators``: exactly these initiators see LUN ``name``."""

    name: str
    initiators: list[str]


@dataclass(frozen=True)
class LunName(Message):
    """Request naming one LUN (``delete_lun``, ``refresh_capacity``)."""

    name: str


@dataclass(frozen=True)
class LunDeleted(Message):
    """Reply of ``delete_lun``; ``deleted`` is False when there was no such LUN."""

    name: str
    deleted: bool


@dataclass(frozen=True)
class Capacity(Message):
    """Reply of ``refresh_capacity``: the LUN's capacity as LIO reports it now."""

    name: str
    size_bytes: int
    device: str
    #: the LUN's NAA ID and number, and the size the agent had recorded before this read;
    #: None for a LUN the agent does not watch (not exported through this agent instance)
    naa: str | None = None
    lun: int | None = None
    previous_size_bytes: int | None = None


@dataclass(frozen=True)
class PortalSet(Message):
    """Request of ``portal_set``: take the iSCSI portal down (new logins refused) or up."""

    up: bool


@dataclass(frozen=True)
class PortalState(Message):
    """Reply of ``portal_set``."""

    up: bool
    #: the portals the TPG has now (``ip:port``)
    portals: list[str]


@dataclass(frozen=True)
class Route(Message):
    """A route of the node: ``subnet`` (another site's) through ``via`` (a WAN router)."""

    subnet: str
    via: str


@dataclass(frozen=True)
class SetRoutes(Message):
    """Request of ``set_routes``: the node's routes to other sites, all of them (a route
    not listed is removed); TCP buffers big enough for one flow to fill a long link."""

    routes: list[Route]


@dataclass(frozen=True)
class RoutesSet(Message):
    routes: list[Route]


# --- a machine's data disks (loop devices on sparse files) ---------------------------------

@dataclass(frozen=True)
class DiskSpec(Message):
    """Request of ``disk_ensure`` and ``disk_resize``: the data disk ``serial`` (the name a
    LUN's ``disk_serial`` gives) of ``size_bytes``; a disk only grows."""

    serial: str
    size_bytes: int


@dataclass(frozen=True)
class DiskSerial(Message):
    """Request of ``disk_remove``."""

    serial: str


@dataclass(frozen=True)
class DiskInfo(Message):
    """A data disk of a machine's node as its kernel has it now."""

    serial: str
    #: the loop device (``/dev/loopN``); "" once removed
    device: str
    #: its backing file in the node's ``disk_dir``
    path: str
    size_bytes: int
    #: this call made it (``disk_ensure``), grew it (``disk_resize``), removed it
    #: (``disk_remove``)
    changed: bool


# --- file datastores (NFS exports, files, content IDs, copies) ------------------------------

#: a file every file datastore's export holds (hidden from its listing): a host reads it to
#: prove it can use the export
NFS_MARKER = ".labctl-export"

@dataclass(frozen=True)
class EnsureFilestore(Message):
    """Request of ``ensure_filestore``: make (once), mount and export a file datastore on the
    virtio disk ``disk_serial`` to exactly ``clients`` (host addresses)."""

    name: str
    disk_serial: str
    #: 32 hex digits: the ext4 filesystem's UUID (the datastore ID's unit serial)
    fs_uuid: str
    clients: list[str]


@dataclass(frozen=True)
class FilestoreInfo(Message):
    """Reply of ``ensure_filestore``: the export as it is now."""

    name: str
    #: the exported directory (``nfs://<node>/<export>/<file>`` names a file on it)
    export: str
    fs_uuid: str
    size_bytes: int
    free_bytes: int
    clients: list[str]
    #: this call made the filesystem (a new datastore)
    created: bool
    files: int


@dataclass(frozen=True)
class FilestoreDeleted(Message):
    name: str
    deleted: bool


@dataclass(frozen=True)
class DatastoreName(Message):
    datastore: str


@dataclass(frozen=True)
class FileRef(Message):
    """One file of a file datastore (files are flat: a name, no directories)."""

    datastore: str
    name: str


@dataclass(frozen=True)
class FileEntry(Message):
    """One file of a file datastore as the storage agent sees it now."""

    name: str
    #: ``qcow2``, ``raw`` or ``unknown`` (header unreadable: see ``problem``)
    format: str
    virtual_size: int
    #: the file's length and the bytes it occupies (sparse files occupy less)
    size_bytes: int
    allocated_bytes: int
    backing_file: str | None
    backing_format: str | None
    #: ``cid.`` and 32 hex digits; None while the file is being written
    content_id: str | None
    #: the parent's content ID when this file's ID was issued
    parent_content_id: str | None
    #: ``quiet``; ``writing`` (no usable ID); ``in-use`` (a running VM's top layer: no
    #: usable ID); ``parent-changed`` (an ancestor's ID is no longer the one this layer
    #: was made on)
    state: str
    problem: str | None = None
    #: the VM whose top layer it is (it holds the file's lease)
    in_use_by: str | None = None


@dataclass(frozen=True)
class FileList(Message):
    """Reply of ``list_files``."""

    datastore: str
    export: str
    size_bytes: int
    free_bytes: int
    files: list[FileEntry]


@dataclass(frozen=True)
class Chain(Message):
    """Reply of ``chain``: a file and its backing files, top first."""

    datastore: str
    layers: list[FileEntry]


@dataclass(frozen=True)
class FileDigest(Message):
    """Reply of ``file_digest``: SHA-256 of the layer's content (holes and zero blocks
    alike; the bytes that name its backing file left out, so a copy re-pointed at a parent
    of the same content ID has its source's digest)."""

    datastore: str
    name: str
    digest: str
    #: the ID before and after the read, when they agree (else None: it changed meanwhile)
    content_id: str | None
    seconds: float


@dataclass(frozen=True)
class FileDeleted(Message):
    datastore: str
    name: str
    deleted: bool


@dataclass(frozen=True)
class SendFile(Message):
    """Request of the stream method ``file_send`` (agent to agent)."""

    datastore: str
    name: str
    #: the content ID the receiver expects; the sender refuses any other
    expect: str
    #: also send a digest of the content at the end (frames are MAC'd either way)
    digest: bool = False


@dataclass(frozen=True)
class PullFile(Message):
    """Request of ``pull_file``: copy ``source_name`` from the storage agent at
    ``source_address:source_port`` into ``datastore`` as ``name``."""

    datastore: str
    name: str
    source_address: str
    source_port: int
    source_datastore: str
    source_name: str
    #: the source's content ID; the copy carries it
    expect: str
    #: re-point the copy's backing file here (a file of ``datastore``) ...
    backing: str | None = None
    backing_format: str | None = None
    #: ... which must still carry this content ID when the copy is put in place
    backing_id: str | None = None
    #: digest the data on both ends and compare (each frame is MAC'd either way)
    verify: bool = False


@dataclass(frozen=True)
class Pulled(Message):
    datastore: str
    name: str
    content_id: str
    bytes_moved: int
    #: with ``verify``: the content's digest, the same on both ends
    digest: str | None
    #: the backing file name the copy had before it was re-pointed (None: not re-pointed)
    rebased_from: str | None
    seconds: float


@dataclass(frozen=True)
class Upload(Message):
    """Request of the stream method ``file_upload`` (``labctl image import``)."""

    datastore: str
    name: str
    allocated_bytes: int


@dataclass(frozen=True)
class PeerCopy(Message):
    """Request of ``peer_copy`` (the benchmark's peers, run on the source node): copy the
    chain ``names`` (top first) of ``datastore`` onto the export ``target_export`` of the
    node at ``target_address`` through the kernel's NFS client, by ``method``: ``flatten``
    (``qemu-img convert`` of the top to one qcow2 file) or ``rsync`` (``rsync -S`` of every
    file of the chain). The copies are named ``prefix`` + the source's name."""

    datastore: str
    names: list[str]
    method: str
    target_address: str
    target_export: str
    prefix: str


@dataclass(frozen=True)
class PeerCopied(Message):
    method: str
    #: from the first byte read to the last byte on the target's disk (synced), in s
    seconds: float
    #: the files written on the target
    files: list[str]
    #: what they occupy on the target
    allocated_bytes: int


@dataclass(frozen=True)
class CreateOverlay(Message):
    """Request of ``create_overlay``: a new qcow2 file ``name`` backed by ``backing``
    (which must be quiet, or in use by ``holder``: a snapshot of that VM's top)."""

    datastore: str
    name: str
    #: None: a blank qcow2 image of ``size_bytes``
    backing: str | None
    holder: str | None = None
    size_bytes: int | None = None


@dataclass(frozen=True)
class LeaseFile(Message):
    """Request of ``lease_file``: ``holder`` (a VM) writes ``name`` from now on, or with
    ``release``, no longer (a lease held by another VM is left alone). A leased file has no
    usable content ID and is not deleted."""

    datastore: str
    name: str
    holder: str
    release: bool = False


STATUS = Method("status", Empty, NodeStatus)
PING = Method("ping", Empty, NodePing)
ENSURE_LUN = Method("ensure_lun", EnsureLun, LunEnsured)
SET_INITIATORS = Method("set_initiators", SetInitiators, LunInfo)
DELETE_LUN = Method("delete_lun", LunName, LunDeleted)
REFRESH_CAPACITY = Method("refresh_capacity", LunName, Capacity)
PORTAL_SET = Method("portal_set", PortalSet, PortalState)


# --- events ------------------------------------------------------------------------------
# Each event names the node, its portal and target first, then what happened.

EVENT_LUN_ADDED = "lun_added"
EVENT_LUN_REMOVED = "lun_removed"
EVENT_LUN_CAPACITY_CHANGED = "lun_capacity_changed"
EVENT_PORTAL_DOWN = "portal_down"
EVENT_PORTAL_UP = "portal_up"


@dataclass(frozen=True)
class LunAdded(Message):
    """Event ``lun_added``: ``ensure_lun`` exported a LUN (the fields of its reply)."""

    node: str
    portal: str
    target_iqn: str
    name: str
    lun: int | None
    naa: str
    serial: str
    size_bytes: int
    device: str
    initiators: list[str]
    created: bool


@dataclass(frozen=True)
class LunRemoved(Message):
    """Event ``lun_removed``: ``delete_lun`` removed a LUN. ``device`` (its name under
    /sys/block), ``naa``, ``lun`` and ``size_bytes`` are what the agent had watched, None
    for a LUN it did not watch."""

    node: str
    portal: str
    target_iqn: str
    name: str
    device: str | None
    naa: str | None
    lun: int | None
    size_bytes: int | None
    deleted: bool


@dataclass(frozen=True)
class LunCapacityChanged(Message):
    """Event ``lun_capacity_changed``: a watched LUN's backing disk changed size (the agent
    noticed it by itself, or ``refresh_capacity`` read it)."""

    node: str
    portal: str
    target_iqn: str
    name: str
    naa: str
    lun: int | None
    size_bytes: int
    previous_size_bytes: int
    #: the backing block device (``/dev/vdX``)
    device: str


@dataclass(frozen=True)
class PortalChanged(Message):
    """Events ``portal_down`` and ``portal_up`` (the fields of ``portal_set``'s reply)."""

    node: str
    portal: str
    target_iqn: str
    up: bool
    portals: list[str]


StorageEvent = LunAdded | LunRemoved | LunCapacityChanged | PortalChanged

#: every storage event by name, with its type
EVENTS: dict[str, type[StorageEvent]] = {
    EVENT_LUN_ADDED: LunAdded,
    EVENT_LUN_REMOVED: LunRemoved,
    EVENT_LUN_CAPACITY_CHANGED: LunCapacityChanged,
    EVENT_PORTAL_DOWN: PortalChanged,
    EVENT_PORTAL_UP: PortalChanged,
}


def decode_event(kind: str, data: object) -> StorageEvent | None:
    """The typed form of storage event ``kind`` (ProtocolError if ``data`` does not fit
    it); None for an event this protocol does not define."""
    cls = EVENTS.get(kind)
    return None if cls is None else cls.from_wire(data, f"storage event {kind}")
ENSURE_FILESTORE = Method("ensure_filestore", EnsureFilestore, FilestoreInfo)
DELETE_FILESTORE = Method("delete_filestore", DatastoreName, FilestoreDeleted)
LIST_FILES = Method("list_files", DatastoreName, FileList)
CHAIN = Method("chain", FileRef, Chain)
FILE_DIGEST = Method("file_digest", FileRef, FileDigest)
DELETE_FILE = Method("delete_file", FileRef, FileDeleted)
PULL_FILE = Method("pull_file", PullFile, Pulled)
CREATE_OVERLAY = Method("create_overlay", CreateOverlay, FileEntry)
PEER_COPY = Method("peer_copy", PeerCopy, PeerCopied)
LEASE_FILE = Method("lease_file", LeaseFile, FileEntry)
SET_ROUTES = Method("set_routes", SetRoutes, RoutesSet)
DISK_ENSURE = Method("disk_ensure", DiskSpec, DiskInfo)
DISK_RESIZE = Method("disk_resize", DiskSpec, DiskInfo)
DISK_REMOVE = Method("disk_remove", DiskSerial, DiskInfo)
#: stream methods (bulk data; see ``labctl.core.rpc.Stream``)
FILE_SEND = "file_send"
FILE_UPLOAD = "file_upload"
