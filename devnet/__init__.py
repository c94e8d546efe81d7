"""devnet: the local multi-process network, its scenarios, and the benchmarks."""

from devnet._commands import NODE_PROGRAM, CommandBuilder, check_span, node_command
from devnet._errors import DevnetError, StatusFileError
from devnet._launcher import Devnet, DevnetConfig
from devnet._netns import MAX_NETNS_NODES, NETNS_PORT, NetnsPlan
from devnet._node_handle import NodeHandle
from devnet._procs import STOP_GRACE
from devnet._status import STATUS_FILE, NodeState, NodeStatus, Role, read_status
from devnet._topology import TOPOLOGY_FILE, ProcessRecord, Topology, read_topology

__all__ = [
    "MAX_NETNS_NODES",
    "NETNS_PORT",
    "NODE_PROGRAM",
    "STATUS_FILE",
    "STOP_GRACE",
    "TOPOLOGY_FILE",
    "CommandBuilder",
    "Devnet",
    "DevnetConfig",
    "DevnetError",
    "NetnsPlan",
    "NodeHandle",
    "NodeState",
    "NodeStatus",
    "ProcessRecord",
    "Role",
    "StatusFileError",
    "Topology",
    "check_span",
    "node_command",
    "read_status",
    "read_topology",
]
