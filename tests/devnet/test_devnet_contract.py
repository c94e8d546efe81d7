"""The process contract as the devnet reads it: node argv, status.json, devnet.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from devnet import (
    DevnetError,
    NodeStatus,
    ProcessRecord,
    StatusFileError,
    Topology,
    node_command,
    read_status,
    read_topology,
)
from devnet._topology import write_topology

PEER = "12D3KooWAbc"
GOOD: dict[str, Any] = {
    "pid": 42, "role": "node", "peer_id": PEER,
    "addrs": [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"], "state": "online", "span": [0, 3],
    "model_id": "m1", "future_field": {"ignored": True},
}


def test_serving_node_argv() -> None:
    argv = node_command(role="node", data_dir=Path("/d/node-0"), listen="/ip4/1.2.3.4/tcp/5",
                        bootstrap=["/ip4/a", "/ip4/b"], model=Path("/m"), span="2:4",
                        extra_args=["--link-delay-ms", "30"])
    assert argv == [sys.executable, "-m", "node", "run", "--data-dir", "/d/node-0",
                    "--listen", "/ip4/1.2.3.4/tcp/5", "--bootstrap", "/ip4/a",
                    "--bootstrap", "/ip4/b", "--model", "/m", "--span", "2:4",
                    "--threads", "1", "--no-mdns", "--link-delay-ms", "30"]
    embedded = node_command(role="node", data_dir=Path("/d"), listen="/ip4/1.2.3.4/tcp/5")
    assert "--model" not in embedded and embedded[embedded.index("--span") + 1] == "auto"


def test_bootstrap_argv() -> None:
    argv = node_command(role="bootstrap", data_dir=Path("/d/b"), listen="/ip4/1.2.3.4/tcp/5",
                        bootstrap=["/ignored"], span="1:2", extra_args=["--ignored"])
    assert argv == [sys.executable, "-m", "node", "bootstrap", "--data-dir", "/d/b",
                    "--listen", "/ip4/1.2.3.4/tcp/5", "--no-mdns"]


@pytest.mark.parametrize("span", ["", "auto:1", "3:3", "4:2", "a:b", "-1:2", "1:2:3"])
def test_bad_spans_are_refused(span: str) -> None:
    with pytest.raises(DevnetError, match="span must be"):
        node_command(role="node", data_dir=Path("/d"), listen="/x", span=span)


def test_status_parses_and_ignores_unknown_fields(tmp_path: Path) -> None:
    assert read_status(tmp_path) is None
    (tmp_path / "status.json").write_text(json.dumps(GOOD))
    status = read_status(tmp_path)
    assert status == NodeStatus(pid=42, role="node", peer_id=PEER, addrs=(GOOD["addrs"][0],),
                                state="online", span=(0, 3), model_id="m1")
    assert status.online and status.rebalances == 0  # absent: the stub, an older node
    (tmp_path / "status.json").write_text(json.dumps({**GOOD, "rebalances": 2}))
    status = read_status(tmp_path)
    assert status is not None and status.rebalances == 2


@pytest.mark.parametrize(("change", "complaint"), [
    ({"pid": "42"}, "pid"),
    ({"pid": True}, "pid"),
    ({"role": "client"}, "role"),
    ({"peer_id": ""}, "peer_id"),
    ({"addrs": "/ip4/x"}, "addrs"),
    ({"addrs": ["/ip4/127.0.0.1/tcp/1/p2p/someone-else"]}, "ending in /p2p/"),
    ({"state": "ready"}, "state"),
    ({"span": [3, 1]}, "span"),
    ({"span": [0, 1, 2]}, "span"),
    ({"model_id": 7}, "model_id"),
    ({"rebalances": -1}, "rebalances"),
    ({"rebalances": "1"}, "rebalances"),
])
def test_status_violations_blame_the_node(
    tmp_path: Path, change: dict[str, Any], complaint: str
) -> None:
    (tmp_path / "status.json").write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(StatusFileError, match=complaint):
        read_status(tmp_path)


def test_half_written_status_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text('{"pid": 4')
    with pytest.raises(StatusFileError, match="temp file"):
        read_status(tmp_path)


def test_topology_round_trips(tmp_path: Path) -> None:
    def record(index: int | None) -> ProcessRecord:
        name = "bootstrap" if index is None else f"node-{index}"
        return ProcessRecord(
            name=name, index=index, role="bootstrap" if index is None else "node", pid=10,
            peer_id=PEER, addrs=(f"/ip4/1.1.1.1/tcp/1/p2p/{PEER}",), listen="/ip4/1.1.1.1/tcp/1",
            data_dir=tmp_path / name, log=tmp_path / f"{name}.log", command=("python", "x"),
            netns="ns" if index else None, veth="v" if index else None,
        )

    topology = Topology(root=tmp_path, launcher_pid=1, detached=True, netns_tag="abcdef",
                        bootstrap=record(None), nodes=(record(0), record(1)))
    write_topology(topology)
    assert read_topology(tmp_path) == topology
    assert topology.find(None).name == "bootstrap" and topology.find(1).name == "node-1"
    with pytest.raises(DevnetError, match="no node 2"):
        topology.find(2)
    (tmp_path / "devnet.json").write_text(json.dumps({"version": 1, "nodes": "x"}))
    with pytest.raises(DevnetError):
        read_topology(tmp_path)
