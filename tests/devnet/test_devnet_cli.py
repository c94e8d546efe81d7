"""``shardnet devnet`` subcommands, run as real processes the way a developer runs them."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from devnet import read_status, read_topology
from devnet._procs import owns, proc_state
from devnet.cli import add_devnet_parser, node_args

NETNS_OK = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") is not None


async def cli(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    done = await trio.run_process(
        [sys.executable, "-m", "devnet.cli", *map(str, args)],
        check=False, capture_stdout=True, capture_stderr=True,
    )
    return done


def ok(done: subprocess.CompletedProcess[bytes]) -> str:
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    return out


def test_mounts_under_the_shardnet_cli() -> None:
    parser = argparse.ArgumentParser(prog="shardnet")
    add_devnet_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["devnet", "up", "--nodes", "2", "--netns", "--detach"])
    assert (args.nodes, args.netns, args.detach, callable(args.func)) == (2, True, True, True)
    args = parser.parse_args(["devnet", "cut-off", "1", "--dir", "/x"])
    assert (args.devnet_command, args.node, args.dir) == ("cut-off", 1, Path("/x"))
    assert parser.parse_args(["devnet", "kill", "bootstrap"]).node is None
    with pytest.raises(SystemExit):
        parser.parse_args(["devnet", "kill", "-1"])


def test_up_passes_link_shaping_to_every_node(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="shardnet")
    add_devnet_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["devnet", "up", "--link-delay-ms", "40", "--link-bandwidth-mbps",
                              "2.5", "--node-arg=--rebalance-interval=5"])
    assert node_args(args) == ["--link-delay-ms", "40", "--link-bandwidth-mbps", "2.5",
                               "--rebalance-interval=5"]
    assert node_args(parser.parse_args(["devnet", "up"])) == []
    with pytest.raises(SystemExit):
        parser.parse_args(["devnet", "up", "--link-delay-ms", "-1"])
    assert "finite number >= 0" in capsys.readouterr().err
    # What the nodes are given, the node CLI turns into its host's shaping.
    from node._node_cli import add_node_parser, config_from_args

    node_parser = argparse.ArgumentParser(prog="shardnet")
    add_node_parser(node_parser.add_subparsers(dest="command", required=True))
    config = config_from_args(node_parser.parse_args(
        ["node", "run", "--data-dir", "/d", *node_args(args)]))
    host = config.host_config()
    assert (host.link_delay_s, host.link_bandwidth_bps) == (0.04, 312_500.0)
    assert config.rebalance_interval_s == 5


async def test_detached_up_scenarios_and_down(run_dir: Path, h: Any) -> None:
    program = shlex.join(h.stub_program)
    out = ok(await cli("up", "--detach", "--nodes", "2", "--dir", run_dir, "--program", program))
    assert "detached" in out and "node-1" in out
    topology = read_topology(run_dir)
    assert topology is not None and topology.detached
    for p in topology.processes:
        assert p.pid is not None and owns(p.pid, p.data_dir)
        assert os.getsid(p.pid) == p.pid  # its own session: it outlived the CLI
    node0, node1 = topology.nodes

    out = ok(await cli("status", "--dir", run_dir))
    assert "node-0" in out and "online" in out

    ok(await cli("freeze", "1", "--dir", run_dir))
    assert node1.pid is not None
    await h.until(lambda: proc_state(node1.pid) == "T")
    assert "frozen" in ok(await cli("status", "--dir", run_dir))
    ok(await cli("thaw", "1", "--dir", run_dir))
    await h.until(lambda: proc_state(node1.pid) != "T")

    ok(await cli("kill", "0", "--dir", run_dir))
    await h.until(lambda: not owns(node0.pid, node0.data_dir))
    assert "dead" in ok(await cli("status", "--dir", run_dir))
    out = ok(await cli("restart", "0", "--dir", run_dir))
    assert "online again" in out
    restarted = read_topology(run_dir)
    assert restarted is not None
    new0 = restarted.nodes[0]
    assert new0.pid != node0.pid and new0.peer_id == node0.peer_id
    status = read_status(new0.data_dir)
    assert status is not None and status.pid == new0.pid and status.online

    failed = await cli("cut-off", "0", "--dir", run_dir)
    assert failed.returncode == 1 and b"not --netns" in failed.stderr

    out = ok(await cli("down", "--dir", run_dir))
    assert "is down" in out
    h.assert_clean(run_dir)
    assert read_topology(run_dir) is None
    failed = await cli("status", "--dir", run_dir)
    assert failed.returncode == 1 and b"no devnet" in failed.stderr


@pytest.mark.parametrize("stop_by", ["SIGINT", "SIGTERM", "down"])
async def test_foreground_up_stops_cleanly(run_dir: Path, h: Any, stop_by: str) -> None:
    program = shlex.join(h.stub_program)
    argv = [sys.executable, "-m", "devnet.cli", "up", "--nodes", "1", "--dir", str(run_dir),
            "--program", program]
    log = run_dir.parent / "cli.log"
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process(argv, stdout=out, stderr=subprocess.STDOUT)
    try:

        def all_online() -> bool:
            topology = read_topology(run_dir)
            return topology is not None and all(p.peer_id for p in topology.processes)

        await h.until(all_online)
        if stop_by == "down":
            ok(await cli("down", "--dir", run_dir))
        else:
            proc.send_signal(getattr(signal, stop_by))
        with trio.fail_after(15):
            assert await proc.wait() == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    expected = "down from elsewhere" if stop_by == "down" else f"{stop_by}: stopping the devnet"
    assert expected in log.read_text()
    h.assert_clean(run_dir)


async def test_ctrl_c_during_start_stops_everything(run_dir: Path, h: Any) -> None:
    program = shlex.join(h.stub_program)
    argv = [sys.executable, "-m", "devnet.cli", "up", "--nodes", "2", "--dir", str(run_dir),
            "--program", program, "--node-arg=--never-online"]
    log = run_dir.parent / "cli.log"
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process(argv, stdout=out, stderr=subprocess.STDOUT)
    try:

        def nodes_joining() -> bool:
            statuses = [read_status(run_dir / f"node-{i}") for i in range(2)]
            return all(s is not None and s.state == "joining" for s in statuses)

        await h.until(nodes_joining)
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            assert await proc.wait() == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    h.assert_clean(run_dir)


@pytest.mark.skipif(not NETNS_OK, reason="network namespaces need root and iproute2")
async def test_detached_netns_cut_off_and_down(run_dir: Path, h: Any) -> None:
    program = shlex.join(h.stub_program)
    ok(await cli("up", "--detach", "--netns", "--nodes", "1", "--dir", run_dir,
                 "--program", program))
    topology = read_topology(run_dir)
    assert topology is not None and topology.netns_tag is not None
    veth = topology.nodes[0].veth
    assert veth is not None

    def link_up() -> bool:
        return bool(int(Path(f"/sys/class/net/{veth}/flags").read_text(), 16) & 1)

    ok(await cli("cut-off", "0", "--dir", run_dir))
    assert not link_up()
    assert "cut-off" in ok(await cli("status", "--dir", run_dir))
    ok(await cli("reconnect", "0", "--dir", run_dir))
    assert link_up()
    ok(await cli("down", "--dir", run_dir))
    h.assert_clean(run_dir)
