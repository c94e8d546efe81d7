"""The daemon: its configuration (flags, TOML), and as real processes: graceful shutdown,
restart with the same identity, no orphans."""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import pytest
import trio

from devnet import Devnet
from node._client import Client, ClientConfig
from node._daemon import NodeConfig, default_prefill_threads, should_pack
from node._errors import NodeError
from node._node_cli import add_node_parser, config_from_args
from node._worker import ServerLimits


def parse(*argv: str) -> NodeConfig:
    parser = argparse.ArgumentParser(prog="shardnet")
    add_node_parser(parser.add_subparsers(dest="command", required=True))
    return config_from_args(parser.parse_args(["node", *argv]))


def test_link_shaping_flags_reach_the_host_config() -> None:
    config = parse("run", "--data-dir", "/d", "--link-delay-ms", "25",
                   "--link-bandwidth-mbps", "8")
    assert (config.link_delay_s, config.link_bandwidth_bps) == (0.025, 1_000_000.0)
    host = config.host_config()
    assert (host.link_delay_s, host.link_bandwidth_bps) == (0.025, 1_000_000.0)
    # The bootstrap is a host too; unshaped by default.
    boot = parse("bootstrap", "--data-dir", "/d", "--link-delay-ms", "5").host_config()
    assert (boot.link_delay_s, boot.link_bandwidth_bps) == (0.005, 0.0)
    assert parse("run", "--data-dir", "/d").host_config().link_delay_s == 0.0


def test_toml_sets_shaping_and_rebalancing_and_flags_win(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text("link_delay_s = 0.1\nlink_bandwidth_bps = 5e5\nrebalance_interval_s = 7.5\n"
                    "max_cache_tokens = 4096\n")
    config = parse("run", "--data-dir", "/d", "--config", str(toml))
    assert (config.link_delay_s, config.link_bandwidth_bps) == (0.1, 5e5)
    assert (config.rebalance_interval_s, config.limits.max_cache_tokens) == (7.5, 4096)
    config = parse("run", "--data-dir", "/d", "--config", str(toml), "--link-delay-ms", "1",
                   "--rebalance-interval", "0")
    assert (config.link_delay_s, config.rebalance_interval_s) == (0.001, 0.0)
    assert config.link_bandwidth_bps == 5e5


def test_bad_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse("run", "--data-dir", "/d", "--link-delay-ms", "-3")
    with pytest.raises(SystemExit):
        parse("run", "--data-dir", "/d", "--link-bandwidth-mbps", "inf")
    for bad in ({"rebalance_interval_s": -1.0}, {"wake_check_interval_s": 0.0},
                {"link_bandwidth_bps": float("nan")}, {"rebalance_min_improvement": 0.9}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NodeConfig(data_dir=tmp_path, **bad)
    toml = tmp_path / "node.toml"
    toml.write_text("link_delay_ms = 5\n")  # keys are field names; the unit is in the name
    with pytest.raises(NodeError, match="unknown keys link_delay_ms"):
        NodeConfig.from_toml(toml, data_dir=tmp_path)


@pytest.mark.parametrize(("toml", "says"), [
    ('threads = "many"\n', "threads must be an integer, got 'many'"),
    ('bootstrap = "/ip4/127.0.0.1/tcp/1/p2p/x"\n', "bootstrap must be a list of strings"),
    ("listen = [4001]\n", "listen must be a list of strings"),
    ('mdns = "no"\n', "mdns must be true or false"),
    ("max_length = 1.5\n", "max_length must be an integer, got 1.5"),
    ("memory_budget_bytes = true\n", "memory_budget_bytes must be an integer"),
    ("span = 3\n", "span must be a string"),
])
def test_toml_values_of_the_wrong_type_are_refused(
    tmp_path: Path, toml: str, says: str
) -> None:
    path = tmp_path / "node.toml"
    path.write_text(toml)
    with pytest.raises(NodeError, match=re.escape(f"{path}: {says}")):
        NodeConfig.from_toml(path, data_dir=tmp_path)


def test_thread_counts_and_limits_below_one_are_refused(tmp_path: Path) -> None:
    for flag in ("--threads", "--prefill-threads", "--max-sessions", "--max-cache-tokens",
                 "--max-length"):
        with pytest.raises(SystemExit):
            parse("run", "--data-dir", "/d", flag, "0")
    for bad in ({"threads": 0}, {"prefill_threads": 0}, {"threads": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NodeConfig(data_dir=tmp_path, **bad)
    assert NodeConfig(data_dir=tmp_path, prefill_threads=None).prefill_threads is None
    with pytest.raises(ValueError, match="max_length must be a positive int, got 0"):
        ServerLimits(max_length=0)


def test_a_packed_copy_is_held_only_with_memory_to_spare(tmp_path: Path) -> None:
    kw = {"span_bytes": 300, "weight_bytes": 200}
    assert should_pack("auto", budget_bytes=500, **kw)
    assert not should_pack("auto", budget_bytes=499, **kw)  # the stages come first
    assert should_pack("on", budget_bytes=0, **kw)
    assert not should_pack("off", budget_bytes=10**12, **kw)
    assert parse("run", "--data-dir", "/d").packed_weights == "auto"
    assert parse("run", "--data-dir", "/d", "--packed-weights", "off").packed_weights == "off"
    with pytest.raises(SystemExit):
        parse("run", "--data-dir", "/d", "--packed-weights", "maybe")
    with pytest.raises(ValueError, match="packed_weights"):
        NodeConfig(data_dir=tmp_path, packed_weights="yes")


def test_prefill_threads_default_to_the_cores_this_process_may_use(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A container or `taskset` that allows two cores of a 16-core host.
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5}, raising=False)
    assert default_prefill_threads(1) == 2
    assert default_prefill_threads(3) == 3  # never fewer than the decode threads


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


async def test_drain_restart_and_no_orphans(tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "net"
    with trio.fail_after(120):
        async with Devnet(2, root=root, model=tiny_model, spans=["0:3", "3:6"]) as net:
            node = net.nodes[1]
            peer_id = node.peer_id
            # A generation through both nodes works.
            async with Client(bootstrap=net.bootstrap_addrs, model=tiny_model,
                              config=ClientConfig(route_timeout_s=30)) as client:
                assert await client.generate_text("The list type", max_new_tokens=8)
            # SIGTERM: the node drains and exits cleanly, well within 5 s.
            started = time.monotonic()
            assert await node.stop() == 0  # SIGTERM; SIGKILL would only come after 8 s
            assert time.monotonic() - started < 5
            status = node.status()
            assert status is not None and status.state == "stopped"
            # Same data dir, same identity.
            await node.restart()
            assert node.peer_id == peer_id
            async with Client(bootstrap=net.bootstrap_addrs, model=tiny_model,
                              config=ClientConfig(route_timeout_s=30)) as client:
                assert await client.generate_text("The list type", max_new_tokens=8)
    assert _processes_mentioning(str(root)) == []
