"""CLI for image files on file datastores and chain copy.

    labctl datastore files DS [--json]
    labctl image import FILE --to DS [--name NAME] [--json]
    labctl image clone DS:FILE NAME [--json]
    labctl image delete DS:FILE [--json]
    labctl chain copy DS:FILE|VM --to DS [--snapshot] [--verify] [--json]
"""

from __future__ import annotations

import argparse

from labctl.cli.labs import emit
from labctl.cli.progress import Progress
from labctl.core.errors import LabStateError
from labctl.core.sizes import human_size
from labctl.datastores import chaincopy, filestores
from labctl.lab.face import Lab


def split_ref(text: str) -> tuple[str, str]:
    """``DATASTORE:FILE`` as its two parts (a clear refusal when it is not that)."""
    ds, colon, name = text.partition(":")
    if not colon or not ds or not name:
        raise LabStateError(f"{text!r}: name a file as DATASTORE:FILE (e.g. fs1:base.qcow2)",
                            ref=text)
    return ds, name


async def run(args: argparse.Namespace, progress: Progress) -> int:
    lab = Lab.find(args.lab, progress=progress, site=args.site)
    lab.require_up()
    if args.cmd == "image":
        return await _image(lab, args)
    if args.cmd == "chain":
        if ":" in args.source:
            if args.snapshot:
                raise LabStateError("--snapshot is for a VM: name the VM instead of a file")
            ds, name = split_ref(args.source)
        else:
            ds, name = await lab.vm_source(args.source, args.snapshot)
        with lab.lab_context() as whole, whole.lock():
            # a chain copied between sites: the lab's operator holds both sites' controllers
            src = whole.in_site(lab.pick_site(whole, of=("datastore", ds)))
            dst = whole.in_site(lab.pick_site(whole, of=("datastore", args.to)))
            done = await chaincopy.copy(src, ds, name, dst, args.to, verify=args.verify)
        if args.json:
            emit(done.to_wire())
            return 0
        print_copy(done)
        return 0
    raise AssertionError(args.cmd)


async def _image(lab: Lab, args: argparse.Namespace) -> int:
    if args.action == "import":
        with lab.context(of=("datastore", args.to)) as ctx, ctx.lock():
            imported = await filestores.import_image(ctx, args.file, args.to, args.name)
        if args.json:
            emit(imported.to_wire())
            return 0
        f = imported.file
        print(f"{imported.datastore}:{f.name}  {f.format} {human_size(f.virtual_size)}  "
              f"{f.content_id}  ({human_size(imported.bytes_moved)} moved in "
              f"{imported.seconds:.1f} s)")
        return 0
    ds, name = split_ref(args.source)
    if args.action == "clone":
        with lab.context(of=("datastore", ds)) as ctx, ctx.lock():
            entry = await filestores.clone(ctx, ds, name, args.name)
        if args.json:
            emit(entry.to_wire())
            return 0
        print(f"{ds}:{entry.name}  qcow2 layer on {entry.backing_file}  {entry.content_id}")
        return 0
    if args.action == "delete":
        with lab.context(of=("datastore", ds)) as ctx, ctx.lock():
            gone = await filestores.delete_file(ctx, ds, name)
        if args.json:
            emit(gone.to_wire())
            return 0
        print(f"{ds}:{name} deleted" if gone.deleted else f"{ds}:{name} was not there")
        return 0
    raise AssertionError(args.action)


def print_files(listed: filestores.FilesListed) -> None:
    print(f"datastore {listed.datastore} ({listed.naa}) at {listed.url or '-'}: "
          f"{human_size(listed.free_bytes)} free of {human_size(listed.size_bytes)}")
    if not listed.files:
        print("  no files")
        return
    print(f"  {'FILE':<22} {'FORMAT':<6} {'VSIZE':>9} {'ALLOC':>9}  {'BACKING':<18} "
          f"{'CONTENT ID':<20} {'PARENT ID':<20} STATE")
    for f in listed.files:
        print(f"  {f.name:<22} {f.format:<6} {human_size(f.virtual_size):>9} "
              f"{human_size(f.allocated_bytes):>9}  {f.backing_file or '-':<18} "
              f"{_short(f.content_id):<20} {_short(f.parent_content_id):<20} {f.state}"
              + (f" ({f.problem})" if f.problem else ""))


def _short(cid: str | None) -> str:
    return "-" if cid is None else cid[:20]


def print_copy(done: chaincopy.ChainCopied) -> None:
    for layer in done.layers:
        if layer.action == "reused":
            print(f"  {layer.source:<22} reused   {done.target_datastore}:{layer.target} "
                  f"(same content ID {layer.content_id[:20]}"
                  + (", digests compared" if layer.verified else "") + ")")
        else:
            extra = " (name taken by other content: renamed)" if layer.renamed else ""
            onto = f", re-pointed from {layer.rebased_from}" if layer.rebased_from else ""
            print(f"  {layer.source:<22} copied   {done.target_datastore}:{layer.target}  "
                  f"{human_size(layer.bytes_moved)} in {layer.seconds:.1f} s{onto}{extra}")
    print(f"{done.source_datastore} -> {done.target_datastore}: top {done.top}; "
          f"{human_size(done.bytes_moved)} moved (the missing layers hold "
          f"{human_size(done.missing_bytes)}; the whole chain {human_size(done.chain_bytes)})"
          f" in {done.seconds:.1f} s")

