"""The WAN links' table in the lab inventory, declared apart from the WAN service so that
opening an inventory imports none of it."""

from __future__ import annotations

from labctl.state.inventory import Schema

WAN = Schema("wan", """
CREATE TABLE IF NOT EXISTS wan_links (
    name TEXT PRIMARY KEY, idx INTEGER NOT NULL, site_a TEXT NOT NULL, site_b TEXT NOT NULL,
    address_a TEXT NOT NULL, address_b TEXT NOT NULL, prefix_a INTEGER NOT NULL,
    prefix_b INTEGER NOT NULL, domain TEXT NOT NULL, agent_port INTEGER NOT NULL,
    params TEXT NOT NULL, up INTEGER NOT NULL DEFAULT 1, memory_mib INTEGER NOT NULL);
""")
