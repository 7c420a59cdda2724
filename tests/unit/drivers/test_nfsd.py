"""The NFS server's pieces that need no kernel NFS server: what the portmapper lists, the
exports file a node writes, and where a machine's node keeps its file datastores."""

from __future__ import annotations

from labctl.drivers.nfsd import render_exports, services
from labctl.storage.machine import EXPORTS_D, machine_files
from labctl.storage.protocol import NodeConfig

LISTING = """   program vers proto   port  service
    100000    4   tcp    111  portmapper
    100000    2   udp    111  portmapper
    100005    3   tcp  46631  mountd
    100003    3   tcp   2049  nfs
    100021    4   tcp  40211
"""


def test_the_portmapper_s_services_are_read_by_name() -> None:
    assert services(LISTING) == {"portmapper", "mountd", "nfs"}
    assert services("") == set()
    assert services("rpcinfo: can't contact portmapper: RPC: Remote system error") == set()


def test_an_export_names_exactly_its_clients() -> None:
    text = render_exports({"/srv/a/images": ["10.0.0.12", "10.0.0.11"]})
    line = text.splitlines()[1]
    assert line.startswith("/srv/a/images 10.0.0.12(rw,sync,no_root_squash,")
    assert line.count("(") == 2 and "*" not in line


def test_a_machine_s_node_keeps_its_file_datastores_in_its_own_directory() -> None:
    conf = NodeConfig(lab="lab1", node="stor1", address="10.0.0.2/24", gateway=None, mac="",
                      secret="00", target_iqn="iqn.x:y",
                      disk_dir="/var/lib/labctl/labs/ab12/stor1/disks")
    where = machine_files(conf)
    assert str(where.root) == "/var/lib/labctl/labs/ab12/stor1/fs"
    assert str(where.state) == "/var/lib/labctl/labs/ab12/stor1"
    # an exports file of the node's own: another lab's node on the machine has another
    assert where.exports == EXPORTS_D / "labctl-lab1-stor1.exports"
