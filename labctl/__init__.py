"""labctl: a lab testbed for virtualization scenarios on real hypervisors."""
__version__ = "0.1.0"
