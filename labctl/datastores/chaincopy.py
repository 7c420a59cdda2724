"""Chain copy: recreate a qcow2 backing chain on another file datastore, copying only the
layers the target lacks, recognised by **content ID**, never by name.

The walk (top layer first): a layer whose content ID a quiet file on the target carries
is not copied; it is the *anchor*, and every layer above it is copied and the lowest of
them re-pointed at the anchor (``qemu-img rebase -u`` on the target, so no data moves for
it). A match must also be sound: same format and virtual size as the layer it stands for,
its own parent unchanged (state ``quiet``), and its ID read again by the target agent at
the moment the copy is re-pointed; ``verify`` adds a full digest comparison of the two.
A file on the target that merely has the layer's *name* is never used: the copy then
lands under another name.

Layers are copied bottom-up, each one whole and checked before it appears on the target,
so an interrupted copy leaves no half chain and no partial file that could match. The
data moves from storage agent to storage agent (``pull_file``), never through here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from labctl.core.errors import LabStateError
from labctl.core.rpc import RpcClient
from labctl.core.sizes import format_size
from labctl.core.wire import Message
from labctl.datastores import filestores
from labctl.state.context import LabContext
from labctl.storage import protocol as sp

#: a copy needs this much room beyond its data (qcow2 metadata rounding, the ID database)
HEADROOM = 4 << 20


@dataclass(frozen=True)
class LayerCopied(Message):
    """One layer of the source chain and what happened to it (top first)."""

    source: str
    content_id: str
    #: ``copied``, or ``reused`` (a file with this content ID was already on the target)
    action: str
    #: the file on the target that now holds this layer
    target: str
    bytes_moved: int
    seconds: float
    #: its allocated bytes on the source (what copying it costs)
    allocated_bytes: int
    #: the copy's backing file was re-pointed from this name (None: not re-pointed)
    rebased_from: str | None = None
    #: the layer's name was taken on the target by a file with another content ID
    renamed: bool = False
    #: ``verify``: the digests of the layer and its match were compared and agree
    verified: bool = False


@dataclass(frozen=True)
class ChainCopied(Message):
    """``labctl chain copy --json``."""

    source_datastore: str
    target_datastore: str
    #: the target file that stands for the source's top layer
    top: str
    layers: list[LayerCopied]
    bytes_moved: int
    #: what the layers the target lacked occupy on the source (the least any copy moves)
    missing_bytes: int
    #: what copying the whole chain moves (every layer's allocated bytes)
    chain_bytes: int
    seconds: float


@dataclass(frozen=True)
class _Plan:
    copy: list[sp.FileEntry]  # top first
    anchor: sp.FileEntry | None  # the target file the lowest copied layer is re-pointed at
    anchor_for: sp.FileEntry | None  # the source layer the anchor stands for


def plan(layers: list[sp.FileEntry], target: list[sp.FileEntry]) -> _Plan:
    """Which layers to copy: from the top down to the first whose content ID a sound file
    on the target carries (pure: unit-tested)."""
    by_id: dict[str, sp.FileEntry] = {}
    # a sound match is quiet: its own ID current, and its whole chain unchanged below it
    for f in target:
        if f.content_id is not None and f.state == "quiet" and f.problem is None:
            by_id.setdefault(f.content_id, f)
    copy: list[sp.FileEntry] = []
    for layer in layers:
        match = by_id.get(layer.content_id or "")
        if match is not None and match.format == layer.format \
                and match.virtual_size == layer.virtual_size \
                and match.parent_content_id == layer.parent_content_id:
            return _Plan(copy, match, layer)
        copy.append(layer)
    return _Plan(copy, None, None)


def check_chain(datastore: str, layers: list[sp.FileEntry]) -> None:
    """Refuse a chain that cannot be copied as it is: a layer being written, a layer made on
    a parent whose content changed since, a chain that changed while it was listed."""
    for layer in layers:
        if layer.content_id is None and layer.in_use_by is not None:
            raise LabStateError(
                f"{layer.name} on {datastore} is the disk of VM {layer.in_use_by}, which "
                f"writes it: copy the VM with --snapshot (chain copy {layer.in_use_by} "
                "--snapshot), or stop it first", file=layer.name, vm=layer.in_use_by)
        if layer.content_id is None:
            raise LabStateError(
                f"{layer.name} on {datastore} is being written: it has no content ID until "
                "its writer stops (stop or snapshot the VM first)", file=layer.name)
    for layer, below in zip(layers, [*layers[1:], None], strict=True):
        if layer.state != "quiet":
            raise LabStateError(
                f"{layer.name} on {datastore} was made on a parent whose content has changed "
                f"since ({layer.state}): the chain is not consistent", file=layer.name)
        if below is not None and layer.parent_content_id != below.content_id:
            raise LabStateError(
                f"{layer.name} on {datastore} was made on {below.name} as "
                f"{layer.parent_content_id}, which is now {below.content_id}: the chain "
                "changed while it was read; try again", file=layer.name)


def target_name(name: str, content_id: str, taken: set[str]) -> tuple[str, bool]:
    """``name``, or when a file of another content ID has it on the target, ``name`` with
    part of the ID before its extension."""
    if name not in taken:
        return name, False
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    tag = content_id.removeprefix("cid.")[:8]
    candidate = f"{stem}.{tag}{'.' + ext if ext else ''}"
    n = 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}.{tag}-{n}{'.' + ext if ext else ''}"
    return candidate, True


async def copy(ctx: LabContext, source_datastore: str, name: str, to: LabContext,
               target_datastore: str, verify: bool = False) -> ChainCopied:
    """Copy the chain under ``source_datastore:name`` (in ``ctx``'s site) to
    ``target_datastore`` (in ``to``'s site, the same or another): the target's node pulls
    each missing layer straight from the source's node, over the WAN between sites."""
    inv = ctx.inv
    src = filestores.row(inv, source_datastore)
    dst = filestores.row(to.inv, target_datastore)
    if source_datastore == target_datastore and ctx.site == to.site:
        raise LabStateError(f"{name} is already on {target_datastore}: name another "
                            "datastore with --to", datastore=target_datastore)
    src_node = inv.row("storage_nodes", name=src["node"])
    assert src_node is not None
    t0 = time.monotonic()
    chain = await filestores.chain(ctx, source_datastore, name)
    check_chain(source_datastore, chain.layers)
    async with to.storage_client(str(dst["node"]), timeout=10) as c:
        listing = await sp.LIST_FILES.call(c, sp.DatastoreName(datastore=target_datastore),
                                           timeout=120)
        the_plan = plan(chain.layers, listing.files)
        verified = False
        if verify and the_plan.anchor is not None and the_plan.anchor_for is not None:
            verified = await _verify(ctx, str(src["node"]), source_datastore,
                                     the_plan.anchor_for.name, c, target_datastore,
                                     the_plan.anchor.name)
            if not verified:  # same ID, other data: never reuse it; copy the whole chain
                the_plan = _Plan(list(chain.layers), None, None)
        need = sum(layer.allocated_bytes for layer in the_plan.copy)
        if need + HEADROOM > listing.free_bytes:
            raise LabStateError(
                f"{target_datastore} has no room for the {len(the_plan.copy)} missing "
                f"layer(s) of {name}: {format_size(need)} to copy (+{format_size(HEADROOM)} "
                f"headroom), {format_size(listing.free_bytes)} free; nothing was copied",
                need_bytes=need, free_bytes=listing.free_bytes,
                layers=[layer.name for layer in the_plan.copy])
        taken = {f.name for f in listing.files}
        done: dict[str, LayerCopied] = {}
        below_name = the_plan.anchor.name if the_plan.anchor is not None else None
        below_id = the_plan.anchor.content_id if the_plan.anchor is not None else None
        below_format = the_plan.anchor.format if the_plan.anchor is not None else None
        for layer in reversed(the_plan.copy):
            cid = str(layer.content_id)
            new_name, renamed = target_name(layer.name, cid, taken)
            pulled = await sp.PULL_FILE.call(c, sp.PullFile(
                datastore=target_datastore, name=new_name,
                source_address=str(src_node["address"]),
                source_port=int(src_node["agent_port"]), source_datastore=source_datastore,
                source_name=layer.name, expect=cid,
                backing=below_name if layer.backing_file is not None else None,
                backing_format=below_format if layer.backing_file is not None else None,
                backing_id=below_id if layer.backing_file is not None else None,
                verify=verify), timeout=3600)
            taken.add(new_name)
            done[layer.name] = LayerCopied(
                source=layer.name, content_id=cid, action="copied", target=new_name,
                bytes_moved=pulled.bytes_moved, seconds=pulled.seconds,
                allocated_bytes=layer.allocated_bytes, rebased_from=pulled.rebased_from,
                renamed=renamed)
            below_name, below_id, below_format = new_name, cid, layer.format
    # top first: the copied layers, then the one the anchor stands for
    layers_out = [done[layer.name] for layer in the_plan.copy]
    if the_plan.anchor is not None and the_plan.anchor_for is not None:
        reused = the_plan.anchor_for
        layers_out.append(LayerCopied(
            source=reused.name, content_id=str(reused.content_id), action="reused",
            target=the_plan.anchor.name, bytes_moved=0, seconds=0.0,
            allocated_bytes=reused.allocated_bytes, verified=verified))
    return ChainCopied(
        source_datastore=source_datastore, target_datastore=target_datastore,
        top=layers_out[0].target, layers=layers_out,
        bytes_moved=sum(x.bytes_moved for x in layers_out), missing_bytes=need,
        chain_bytes=sum(layer.allocated_bytes for layer in chain.layers),
        seconds=round(time.monotonic() - t0, 3))


async def _verify(ctx: LabContext, src_node: str, src_ds: str, src_name: str,
                  dst_client: RpcClient, dst_ds: str, dst_name: str) -> bool:
    async with ctx.storage_client(src_node, timeout=10) as c:
        a = await sp.FILE_DIGEST.call(c, sp.FileRef(datastore=src_ds, name=src_name),
                                      timeout=3600)
    b = await sp.FILE_DIGEST.call(dst_client, sp.FileRef(datastore=dst_ds, name=dst_name),
                                  timeout=3600)
    return a.digest == b.digest and a.content_id is not None and a.content_id == b.content_id
