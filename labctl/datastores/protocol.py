"""The host's storage protocol: the controller and the rescan service ask a host agent
about the datastores it sees (its storage cache), and the host publishes storage events
it notices. Imports only ``labctl.core``."""

from __future__ import annotations

#: events a host publishes about a unit: ``{host, unit, ...}``
HOST_EVENTS = ("host_capacity_changed", "unit_attention", "io_error")
