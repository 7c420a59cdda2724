"""Agent-based replication between two clouds: a VM's disk copied pass after pass by agents
in the source and destination guests until a switchover criterion holds, then a cutover."""
