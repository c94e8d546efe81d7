"""node: the daemon, the inference service, the client SDK and routing, and the CLI."""

import os

# Before torch loads OpenMP (GNU libgomp here): idle workers spin ~1000 iterations, then sleep.
# Nodes share cores with other nodes and clients (a devnet, a laptop); with libgomp's default
# (300,000) the workers of a node that just finished a prefill kept spinning on the cores the
# next hop needed, and with no spinning at all (OMP_WAIT_POLICY=PASSIVE) a 2-thread prefill
# lost a third of its speedup to wake-ups between operations. An explicit setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# And before torch loads numpy, OpenBLAS's idle timeout (`sharding/_openblas.py`).
import sharding._openblas  # noqa: E402, F401

# isort: split

from node._client import Client, ClientConfig, RunInfo, generate_blocking
from node._daemon import NodeConfig, RunningNode, run_node
from node._errors import GenerationError, HopFailedError, NodeError, RefusedError
from node._generate import GenerationStats
from node._routing import (
    BanEntry,
    BanList,
    BanPolicy,
    CostModel,
    Hop,
    NoRouteError,
    Route,
    RouteRequest,
    TrustPenalty,
    find_route,
    format_stages,
    no_trust_penalty,
    route_cost,
)
from node._sampling import (
    InvalidLogitsError,
    Sampler,
    SamplingParams,
    StopCheck,
    check_stop,
    token_probabilities,
)
from node._snapshots import PeerSnapshot, PeerState, StageSpan
from node._span_choice import (
    SpanDoesNotFitError,
    choose_span,
    per_stage_throughput,
    should_rebalance,
    stage_memory_bytes,
    startup_jitter_s,
)

__all__ = [
    "Client",
    "ClientConfig",
    "GenerationError",
    "GenerationStats",
    "HopFailedError",
    "NodeConfig",
    "NodeError",
    "RefusedError",
    "RunInfo",
    "RunningNode",
    "generate_blocking",
    "run_node",
    "BanEntry",
    "BanList",
    "BanPolicy",
    "CostModel",
    "Hop",
    "InvalidLogitsError",
    "NoRouteError",
    "PeerSnapshot",
    "PeerState",
    "Route",
    "RouteRequest",
    "Sampler",
    "SamplingParams",
    "SpanDoesNotFitError",
    "StageSpan",
    "StopCheck",
    "TrustPenalty",
    "check_stop",
    "choose_span",
    "find_route",
    "format_stages",
    "no_trust_penalty",
    "per_stage_throughput",
    "route_cost",
    "should_rebalance",
    "stage_memory_bytes",
    "startup_jitter_s",
    "token_probabilities",
]
