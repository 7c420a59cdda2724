"""Sites as management domains, on inventories made by hand: a site's context sees its own
inventory alone, a command finds the site of what it names, and a name that is in no site
or in two is refused in one line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from labctl.core.errors import LabStateError
from labctl.lab.face import SCHEMAS, Lab
from labctl.state.labdir import LabDir


def _lab(root: Path, sites: dict[str, list[str]]) -> Lab:
    """Lab ``t`` with ``sites`` (site -> its hosts), each in its own inventory."""
    d = LabDir("t", root)
    d.create()
    inv = d.inventory(SCHEMAS)
    try:
        for i, (site, hosts) in enumerate(sites.items()):
            inv.upsert("sites", name=site, subnet=f"10.9.{i}.0/24", bridge=f"br{i}")
            d.create_site(site)
            own = d.site_inventory(site, SCHEMAS)
            try:
                for h in hosts:
                    own.upsert("hosts", name=h, site=site, address="10.9.0.9",
                               initiator_iqn=f"iqn.x:{h}", netns=f"n-{h}", veth=f"v-{h}",
                               agent_port=1, memory=1 << 30, agent_pid=None, state="up")
            finally:
                own.close()
    finally:
        inv.close()
    return Lab("t", root)


def test_a_site_context_sees_its_own_hosts_and_holds_its_own_secret(tmp_path: Path) -> None:
    lab = _lab(tmp_path, {"a": ["a1", "a2"], "b": ["b1"]})
    with lab.context(of=("host", "b1")) as ctx:
        assert ctx.site == "b"
        assert [r["name"] for r in ctx.inv.rows("hosts")] == ["b1"]
        assert ctx.secret() == lab.dir.site_secret("b") != lab.dir.site_secret("a")
        assert ctx.secret() != lab.dir.secret()
        assert ctx.site_names() == ["a", "b"]  # it knows the sites there are, not their hosts
        with pytest.raises(LabStateError, match="site b's controller cannot work in site a"):
            ctx.in_site("a")
    with lab.lab_context() as whole:
        assert [s.site for s in whole.all_sites()] == ["a", "b"]
        assert whole.inv.rows("hosts") == []
        with pytest.raises(LabStateError, match=r"lab t has no site 'c' \(sites: a, b\)"):
            whole.in_site("c")


@pytest.mark.parametrize(("site", "of", "want"), [
    (None, ("host", "a2"), "a"),
    (None, ("host", "b1"), "b"),
    ("b", ("host", "a2"), "b"),  # --site wins (the CLI refuses a name outside it first)
    (None, ("host", "zz"), "lab t has no host 'zz' in any site (hosts: a1 (a), a2 (a), x1 (a), "
                           "b1 (b), x1 (b))"),
    (None, None, "lab t has sites a, b: say which with --site"),
    (None, ("host", "x1"), "host x1 is in sites a, b: say which with --site"),
])
def test_the_site_a_command_works_in(tmp_path: Path, site: str | None,
                                     of: tuple[str, str] | None, want: str) -> None:
    lab = _lab(tmp_path, {"a": ["a1", "a2", "x1"], "b": ["b1", "x1"]})
    lab.site = site
    with lab.lab_context() as whole:
        if want in ("a", "b"):
            assert lab.pick_site(whole, of=of) == want
        else:
            with pytest.raises(LabStateError) as info:
                lab.pick_site(whole, of=of)
            assert info.value.message == want


def test_a_lab_of_one_site_needs_no_site_named(tmp_path: Path) -> None:
    lab = _lab(tmp_path, {"s1": ["h1"]})
    with lab.context() as ctx:
        assert ctx.site == "s1"

    async def ask(name: str) -> None:
        with lab.context(of=("host", name)) as ctx:
            async with ctx.host_client(name, timeout=0.5):
                pass

    with pytest.raises(LabStateError, match=r"unknown host 'nope' \(hosts: h1\)"):
        asyncio.run(ask("nope"))  # the site's controller says so, listing its hosts


def test_a_migration_to_another_site_s_host_is_refused_before_anything(tmp_path: Path) -> None:
    lab = _lab(tmp_path, {"a": ["a1", "a2"], "b": ["b1"]})
    own = lab.dir.site_inventory("a", SCHEMAS)
    own.upsert("vms", name="vm1", host="a1", datastore=None, memory=1 << 28, vcpus=1,
               dirty_rate=0.0, working_set=0, state="running", pid=None, started_at=None)
    own.close()
    with pytest.raises(LabStateError) as info:
        asyncio.run(lab.migrate("vm1", "b1"))
    assert info.value.message == (
        "host b1 is in site b and VM vm1 in site a: sites share no storage and no management; "
        "migrate it to a host of its own site")
