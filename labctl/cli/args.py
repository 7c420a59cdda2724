"""The command line's grammar, and nothing else: building it imports only argparse, so
``labctl --help`` and a mistyped command answer at once.

Global options (``--lab``, ``--json``, ``-q``, ``-v``) are accepted before or after the
subcommand. Commands are nouns with verbs (``vm list|start|stop|console``,
``datastore list|show|...``, ``migration list|show|policies``); the older spellings
(``migrations``) are kept as aliases.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NoReturn

from labctl import __version__

DEFAULT_TOPOLOGY = "labs/default.yaml"
POLICIES = ("default", "capped", "converge", "postcopy", "strict", "multifd", "late")
LOOKUPS = ("inventory", "poll")
#: ``wan set``'s value options, with an example each; a value may start with '-' (the CLI
#: joins ``--delay -3ms`` into ``--delay=-3ms`` so that labctl, not argparse, refuses it)
WAN_VALUE_OPTIONS = {"--delay": "40ms", "--jitter": "5ms", "--loss": "0.1%%",
                     "--rate": "100mbit", "--reorder": "1%%", "--duplicate": "1%%"}
#: console commands the test guest answers (labctl.guest.protocol.COMMANDS)
CONSOLE_HELP = "rate MiB/s | wss MiB | read | sync | size"


def _count(text: str) -> int:
    """A number of lines or events to show: a whole number, 0 or more (a negative one
    would silently count from the other end)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: give 0 or more")
    return n


class _Parser(argparse.ArgumentParser):
    """A usage error is one line naming the problem and where the help is (exit 2, as
    argparse does), not the usage block then the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _common(top: bool) -> _Parser:
    """The global options; on subcommands they default to 'not given' so that a value given
    before the subcommand is not overwritten."""
    p = _Parser(add_help=False)
    keep = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--lab", help="which lab (default: $LABCTL_LAB, else the only lab that is up)",
                   **({"default": os.environ.get("LABCTL_LAB") or None} if top else keep))
    p.add_argument("--site", help="only this site of the lab (default: $LABCTL_SITE, else all): "
                                  "status shows it alone, other commands refuse what is not in it",
                   **({"default": os.environ.get("LABCTL_SITE") or None} if top else keep))
    p.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout (errors too)",
                   **({"default": False} if top else keep))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr",
                   **({"default": False} if top else keep))
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say where the logs are and show the evidence of an error",
                   **({"default": False} if top else keep))
    return p


class _Sub:
    """``add_parser`` that gives every subcommand the global options."""

    def __init__(self, action: argparse._SubParsersAction[_Parser],
                 common: _Parser) -> None:
        self.action = action
        self.common = common

    def add(self, name: str, help: str, aliases: tuple[str, ...] = (),
            description: str | None = None) -> _Parser:
        return self.action.add_parser(name, help=help, aliases=list(aliases),
                                      description=description or help, parents=[self.common])

    def group(self, parser: _Parser, dest: str = "action",
              default: str | None = None) -> _Sub:
        """Verbs under a noun; with ``default``, the noun alone means that verb."""
        action = parser.add_subparsers(dest=dest, required=default is None, metavar="ACTION")
        if default is not None:
            action.default = default
        return _Sub(action, self.common)


def parser() -> argparse.ArgumentParser:
    common = _common(top=False)
    p = _Parser(prog="labctl", parents=[_common(top=True)],
                description="Lab testbed for virtualization scenarios on real hypervisors.")
    p.add_argument("--version", action="version", version=f"labctl {__version__}")
    sub = _Sub(p.add_subparsers(dest="cmd", required=True, metavar="COMMAND"), common)

    # -- labs
    up = sub.add("up", "bring a lab up from a topology file (idempotent)")
    up.add_argument("file", nargs="?", type=Path,
                    help=f"topology file (default: the topology of the one lab there is, "
                         f"else {DEFAULT_TOPOLOGY})")
    sub.add("status", "show the lab: hosts, storage nodes, datastores, VMs")
    sub.add("ls", "the labs on this machine: name, state, topology, directory")
    down = sub.add("down", "tear the lab down: remove exactly what it created; its records, "
                           "logs and inventory are kept (see --purge)")
    down.add_argument("--purge", action="store_true",
                      help="also delete the lab's directory: records, logs, inventory")
    exp = sub.add("export", "pack a lab's records, logs and inventory into a .tar.gz to share a "
                            "reproduction (its secrets are left out)")
    exp.add_argument("file", type=Path, help="the archive to write, e.g. repro.tar.gz")
    val = sub.add("validate", "check a topology file as 'up' would, without building anything")
    val.add_argument("file", type=Path)
    demo = sub.add("demo", "bring up the default lab, show its VM alive, migrate it there and "
                           "back, grow its datastore, tear down")
    demo.add_argument("file", nargs="?", type=Path, help=f"topology (default {DEFAULT_TOPOLOGY})")
    demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")

    # -- a way in
    ex = sub.add("exec", "run a command on a host (its namespace here, over SSH on a machine)",
                 description="Run CMD on HOST: an argument list, never a shell string "
                             "(labctl exec host1 -- ip addr). Exits with CMD's status.")
    ex.add_argument("host")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    sh = sub.add("shell", "an interactive shell on a host")
    sh.add_argument("host")
    lg = sub.add("logs", "a host agent's, storage node's or the rescan service's log")
    lg.add_argument("what", metavar="HOST|NODE|rescan")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    lg.add_argument("--lines", "-n", type=_count, default=40,
                    help="last N lines first (default 40)")

    # -- VMs
    vm = sub.group(sub.add("vm", "the lab's VMs: list, start, stop, talk to the test guest"))
    vm.add("list", "every VM: host, state, heartbeat, disk counter")
    for verb, what in (("start", "start a VM on its host"), ("stop", "stop a VM")):
        vm.add(verb, what).add_argument("name")
    ssh = vm.add("ssh", "run a command in a server VM (any cloud) over SSH",
                 description="Run a command in a server VM (guest: server, or a libvirt "
                             "cloud's VM) as its cloud's operator: the lab's SSH key, the "
                             "guest's host key as its console printed it. Its output and "
                             "exit status are the command's.")
    ssh.add_argument("name")
    ssh.add_argument("--timeout", metavar="TIME", default="120s",
                     help="how long the command may run (default 120s, e.g. 30min); past it "
                          "its session is closed")
    ssh.add_argument("command", nargs="+", metavar="-- CMD", help="the command and its words")
    snap = vm.add("snapshot", "a running VM on a file datastore writes into a new qcow2 layer "
                              "from now on; the layer below becomes read only and copyable")
    snap.add_argument("name")
    snap.add_argument("--layer", help="the new layer's file name (default <vm>.sN.qcow2)")
    con = vm.add("console", "send a command to the test guest, or show/follow its console",
                 description=f"With a command ({CONSOLE_HELP}), print the guest's answer; "
                             "without one, the last console lines; with --follow, every new "
                             "line, stamped with the time it was read; with --attach, that and "
                             "each line typed is sent as a command (Ctrl-D or Ctrl-C "
                             "detaches; the guest keeps running).")
    con.add_argument("name")
    con.add_argument("command", nargs="*", help=CONSOLE_HELP)
    con.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    con.add_argument("--attach", "-a", action="store_true",
                     help="follow, and send each line typed as a console command")
    con.add_argument("--lines", "-n", type=_count, default=20, help="last N lines (default 20)")

    # -- migration
    mig = sub.add("migrate", "live-migrate a VM to another host (pre-copy over QMP)",
                  description="Live-migrate a VM. The destination's QEMU, disks and datastore "
                              "are made ready before the source is asked to migrate. Ctrl-C "
                              "cancels the migration cleanly (the VM keeps running on the "
                              "source).")
    mig.add_argument("vm")
    where = mig.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="HOST", help="destination host (in the VM's site)")
    where.add_argument("--to-site", metavar="SITE",
                       help="another site: through the two sites' mobility agents, the disk "
                            "mirrored into a new datastore there")
    mig.add_argument("--host", dest="dest_host", metavar="HOST",
                     help="with --to-site: the destination site's host (default: the first "
                          "with room)")
    mig.add_argument("--compress", action="store_true",
                     help="with --to-site: compress the relay's frames where that pays")
    mig.add_argument("--keep-source", action="store_true",
                     help="with --to-site: keep the VM's old datastore in its site as a cold "
                          "copy (by default it is deleted once the VM runs in the new site)")
    mig.add_argument("--policy", default="default", metavar="FILE|NAME",
                     help=f"built-in policy ({', '.join(POLICIES)}) or a YAML file")
    prep = mig.add_mutually_exclusive_group()
    prep.add_argument("--late-storage", dest="late", action="store_true", default=None,
                      help="prepare the destination's storage in the pause-before-switchover "
                           "window (after the source stopped), for comparison")
    prep.add_argument("--early-storage", dest="late", action="store_false",
                      help="prepare it before the migration starts (the default)")
    mig.add_argument("--measure-dirty-rate", action="store_true",
                     help="first measure the guest's dirty rate with QEMU's calc-dirty-rate "
                          "(page sampling, 1 s) and record it with the migration")
    ms = sub.group(sub.add("migration", "recorded migrations: list (the default), show, policies",
                           aliases=("migrations",)), default="list")
    ms.add("list", "every recorded migration (also of a lab that is down)")
    show = ms.add("show", "one migration: result, passes, decisions")
    show.add_argument("id", type=int)
    show.add_argument("--plot", metavar="FILE", type=Path, help="write a timeline PNG")
    ms.add("policies", "the built-in policies")

    # -- replication between clouds
    rep = sub.add("replicate", "move a server VM to another cloud by agents in its guests",
                  description="Replicate a server VM (guest: server) to a libvirt cloud: "
                              "agents copied into the source and a new destination VM copy "
                              "what changed, pass after pass, until the switchover criterion "
                              "holds; then the application is stopped, the last pass made and "
                              "verified, and the VM boots in the other cloud from its "
                              "replicated disk. Until the cutover the source is untouched.")
    rep.add_argument("vm")
    rep.add_argument("--to-cloud", required=True, metavar="SITE",
                     help="the destination cloud (a site with provider: libvirt)")
    rep.add_argument("--switchover", metavar="EXPR|FILE",
                     help="when to cut over: a criterion such as 'predicted_outage <= 2s and "
                          "passes >= 2' (the default), or a YAML file {when, deadline, "
                          "max_passes}; see docs/replication.md")
    rep.add_argument("--tracking", choices=("era", "hash"), default="era",
                     help="how later passes find changed blocks: dm-era's write tracker in "
                          "the source (era, the default; a hash pass after a reboot), or "
                          "per-block digests of the whole disk on both sides (hash)")
    rep.add_argument("--compress", action="store_true",
                     help="compress blocks between the agents where that pays")
    rep.add_argument("--limit", metavar="RATE", help="cap the agents' rate (e.g. 50Mbit/s)")
    rep.add_argument("--verify", choices=("full", "tracked", "both"), default="full",
                     help="the cutover's check of the replica: both disks read whole while "
                          "the source is frozen (full, the default); compared whole before "
                          "the freeze, then only the blocks dm-era saw written since "
                          "(tracked: a shorter outage, the tracker trusted for that while); "
                          "or tracked, then full as its check (both)")
    rep.add_argument("--stall", metavar="TIME", default="30s",
                     help="how long the agents' channel may stall (a cut WAN) before the pass "
                          "fails and is run again from its last flush (default 30s)")
    reps = sub.group(sub.add("replication", "recorded replications: list (the default), show, "
                                            "approve",
                             aliases=("replications",)), default="list")
    reps.add("list", "every recorded replication")
    rshow = reps.add("show", "one replication: passes, verdicts, cutover, outage")
    rshow.add_argument("id", type=int)
    rshow.add_argument("--plot", metavar="FILE", type=Path,
                       help="write a timeline PNG (passes, rates, RPO, the outage)")
    rapprove = reps.add("approve", "let a running replication's cutover go: its criterion's "
                                   "'approved' reads 1 from its next pass on")
    rapprove.add_argument("id", type=int)
    rapprove.add_argument("--withdraw", action="store_true",
                          help="take the approval back: 'approved' reads 0 from the next pass "
                               "on (a cutover under way goes on)")

    # -- datastores and storage
    ds = sub.group(sub.add("datastore", "datastores: create, list, show, resize, delete"))
    c = ds.add("create", "allocate a LUN with an array-style NAA ID for some hosts")
    c.add_argument("name")
    c.add_argument("--size", required=True, help="e.g. 128M, 1G")
    c.add_argument("--hosts", required=True, help="comma-separated hosts allowed to see it")
    c.add_argument("--node", help="storage node (default: the one with most free space)")
    c.add_argument("--kind", choices=["block", "file"], default="block",
                   help="block: an iSCSI LUN (default); file: a filesystem exported over NFS "
                        "to the hosts, holding image files")
    ds.add("list", "every datastore: ID, kind, node, LUN, size, hosts")
    ds.add("files", "every file of a file datastore: format, sizes, backing file, content "
                    "ID, its parent's").add_argument("name")
    ds.add("show", "one datastore's mapping and what each host saw").add_argument("name")
    ds.add("delete", "remove a datastore no VM uses").add_argument("name")
    rs = ds.add("resize", "grow the LUN on the storage node (libvirt block resize); sharing "
                          "hosts are refreshed by the rescan service")
    rs.add_argument("name")
    rs.add_argument("size")
    rs.add_argument("--no-wait", action="store_true", help="do not wait for the rescan outcome")

    host = sub.group(sub.add("host", "a host's own view of storage"))
    hs = host.add("storage", "the host's cached view of the datastores it sees")
    hs.add_argument("host")
    hs.add_argument("--rescan", action="store_true", help="rescan first (everything, or --unit)")
    hs.add_argument("--unit", help="with --rescan: only this datastore ID (or datastore name)")
    hr = host.add("rescan", "make a host rescan (everything, or one unit)")
    hr.add_argument("host")
    hr.add_argument("--unit", help="only this datastore ID (or datastore name)")

    ev = sub.add("events", "storage events and their rescan outcomes")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    ev.add_argument("--last", type=_count, default=0, help="only the last N events")

    rc = sub.group(sub.add("rescan", "rescan service settings"))
    rc.add("lookup", "show or set how sharing hosts are found").add_argument(
        "mode", nargs="?", choices=LOOKUPS)

    vg = sub.group(sub.add("vagrant", "a lab's machines as Vagrant VMs (vagrant-libvirt)"))
    vu = vg.add("up", "the topology's storage nodes and hosts as Vagrant VMs from labctl's "
                      "local box, provisioned by playbooks/ (each host key read from its "
                      "console)")
    vu.add_argument("file", nargs="?", metavar="FILE")
    vu.add_argument("--no-provision", action="store_true",
                    help="bring the machines up without running playbooks/site.yml")
    vd = vg.add("down", "vagrant destroy of the topology's machines; nothing of them left")
    vd.add_argument("file", nargs="?", metavar="FILE")

    wn = sub.group(sub.add("wan", "WAN links between sites (real netem on a router VM)"))
    wn.add("show", "each link: what it was asked to be and what its router applied")
    ws = wn.add("set", "change a link at run time; one value refused changes nothing",
                description="Change WAN link LINK: values as in a topology file (40ms, "
                            "0.1%, 100mbit, unlimited). --down cuts the link, --up restores "
                            "it and returns once a round trip crossed it.")
    ws.add_argument("link")
    for option, example in WAN_VALUE_OPTIONS.items():
        ws.add_argument(option, metavar="VALUE", help=f"like {example}")
    ws.add_argument("--loss-mode", dest="loss_mode", choices=["gso", "packet"],
                    help="gso: fast, loss per 64 KB super-packet; packet: per wire packet")
    updown = ws.add_mutually_exclusive_group()
    updown.add_argument("--down", dest="state", action="store_const", const="down",
                        help="cut the link (both router legs down)")
    updown.add_argument("--up", dest="state", action="store_const", const="up",
                        help="restore it (waits for a round trip across it)")
    wp = wn.add("ping", "round trips across a link, from a host of one site to the other")
    wp.add_argument("link")
    wp.add_argument("-c", "--count", type=_count, default=10, help="pings (default 10)")

    # -- image files on file datastores, and chain copy
    im = sub.group(sub.add("image", "image files on file datastores: import, clone, delete"))
    ii = im.add("import", "copy an image file from this machine onto a file datastore (a "
                          "layer whose backing file is already there, or a whole image)")
    ii.add_argument("file", type=Path)
    ii.add_argument("--to", required=True, metavar="DATASTORE", help="a file datastore")
    ii.add_argument("--name", help="its name there (default: the file's own name)")
    ic = im.add("clone", "a linked clone: a new qcow2 layer on top of an image")
    ic.add_argument("source", metavar="DATASTORE:FILE")
    ic.add_argument("name", help="the new layer's name")
    im.add("delete", "delete an image file no other file is backed by"
           ).add_argument("source", metavar="DATASTORE:FILE")
    ch = sub.group(sub.add("chain", "qcow2 backing chains: copy one, reusing parents by "
                                    "content ID"))
    cc = ch.add("copy", "copy a file and its backing chain to another file datastore, only "
                        "the layers the target lacks (matched by content ID, never by name)")
    cc.add_argument("source", metavar="DATASTORE:FILE|VM",
                    help="a file, or a VM on a file datastore (its disk's chain)")
    cc.add_argument("--to", required=True, metavar="DATASTORE")
    cc.add_argument("--snapshot", action="store_true",
                    help="with a running VM: snapshot it first, then copy the chain below its "
                         "new top (a running VM's top layer is being written)")
    cc.add_argument("--verify", action="store_true",
                    help="also compare full digests: of each reused parent and its match, and of "
                         "each copy on both ends")

    st = sub.group(sub.add("storage", "storage node operations"))
    st.add("restart", "restart a storage node; datastores keep their IDs").add_argument("node")
    st.add("resume", "resume a paused storage node (once the cause, e.g. a full disk, is gone)"
           ).add_argument("node")
    po = st.add("portal", "take a storage node's iSCSI portal down or up")
    po.add_argument("node")
    po.add_argument("state", choices=["up", "down"])
    return p


#: the module that runs each command (imported only when the command runs)
HANDLERS = {
    "up": "labs", "status": "labs", "ls": "labs", "down": "labs", "validate": "labs",
    "demo": "labs", "export": "labs", "exec": "labs", "shell": "labs", "logs": "labs", "vm": "labs",
    "migrate": "migration", "migration": "migration", "migrations": "migration",
    "replicate": "replication", "replication": "replication", "replications": "replication",
    "datastore": "storage", "host": "storage", "events": "storage", "rescan": "storage",
    "storage": "storage", "wan": "wan", "image": "files", "chain": "files",
    "vagrant": "vagrant",
}
