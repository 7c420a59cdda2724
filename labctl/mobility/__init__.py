"""Cross-site live migration through a pair of mobility agents: site A's agent answers as
the destination, site B's as the source, and the VM's memory and disk cross the WAN
between them over one relay channel."""
