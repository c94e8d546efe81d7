"""The process devnet, driven with the stub node: start, scenarios, failures, teardown."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from devnet import Devnet, DevnetError, read_status, read_topology
from devnet._procs import proc_state

READY = 20.0  # generous: the machine is shared; a healthy start takes well under a second


async def test_up_and_down_leaves_nothing(run_dir: Path, h: Any) -> None:
    async with Devnet(3, root=run_dir, node_command=h.stub(), ready_timeout=READY) as net:
        boot = net.bootstrap
        assert len(net.nodes) == 3
        assert len({boot.peer_id, *(n.peer_id for n in net.nodes)}) == 4
        assert net.bootstrap_addrs
        assert all(a.endswith(f"/p2p/{boot.peer_id}") for a in net.bootstrap_addrs)
        ports = {n.listen for n in [boot, *net.nodes]}
        assert len(ports) == 4 and all(p.startswith("/ip4/127.0.0.1/tcp/") for p in ports)
        for i, node in enumerate(net.nodes):
            status = node.status()
            assert status is not None and status.pid == node.pid and status.online
            assert status.role == "node" and status.span == (0, 4)
            argv = list(node.command)
            assert argv[argv.index("--bootstrap") + 1] == net.bootstrap_addrs[0]
            assert argv[argv.index("--data-dir") + 1] == str(run_dir / f"node-{i}")
            assert (run_dir / f"node-{i}.log").read_text().startswith("stub: run")
        with pytest.raises(DevnetError, match="netns"):
            await net.nodes[0].cut_off()

        topology = json.loads((run_dir / "devnet.json").read_text())
        assert topology["bootstrap"]["peer_id"] == boot.peer_id
        assert [n["pid"] for n in topology["nodes"]] == [n.pid for n in net.nodes]
        assert [n["peer_id"] for n in topology["nodes"]] == [n.peer_id for n in net.nodes]
        assert [n["command"] for n in topology["nodes"]] == [list(n.command) for n in net.nodes]
        assert all(n["netns"] is None for n in topology["nodes"])
        handles = [boot, *net.nodes]

    h.assert_clean(run_dir)
    assert not (run_dir / "devnet.json").exists()
    assert [p.returncode for p in handles] == [0, 0, 0, 0]  # each drained on SIGTERM
    assert all(st is not None and st.state == "stopped"
               for st in (read_status(p.data_dir) for p in handles))


async def test_kill_freeze_thaw_restart_stop(run_dir: Path, h: Any) -> None:
    async with Devnet(2, root=run_dir, node_command=h.stub(), ready_timeout=READY) as net:
        a, b = net.nodes
        peer, old_pid = a.peer_id, a.pid

        a.kill()
        assert await a.wait() == -signal.SIGKILL
        assert not a.alive
        with pytest.raises(DevnetError, match="not running"):
            a.freeze()
        await a.restart()
        assert a.alive and a.pid != old_pid
        assert a.peer_id == peer  # same data dir, same identity
        recorded = read_topology(run_dir)
        assert recorded is not None and recorded.nodes[0].pid == a.pid
        assert "restarting node-0" in a.log_path.read_text()

        b.freeze()
        await h.until(lambda: proc_state(b.pid) == "T")
        b.thaw()
        await h.until(lambda: proc_state(b.pid) != "T")

        assert await a.stop() == 0
        await a.restart()  # from stopped
        pid = a.pid
        await a.restart()  # from running: stop, then start
        assert a.pid != pid and a.peer_id == peer

        b.freeze()  # left frozen on purpose: teardown must still drain it cleanly
    h.assert_clean(run_dir)
    assert b.returncode == 0


async def test_early_exit_raises_with_log_tail(run_dir: Path, h: Any) -> None:
    builder = h.stub(per_node={"node-1": ["--exit-early", "3"]})
    with pytest.raises(DevnetError) as info:
        async with Devnet(3, root=run_dir, node_command=builder, ready_timeout=READY):
            pytest.fail("a devnet with a crashing node must not start")
    message = str(info.value)
    assert "node-1" in message and "code 3" in message
    assert "simulated crash: cannot load the model" in message
    h.assert_clean(run_dir)
    assert not (run_dir / "devnet.json").exists()


async def test_ready_timeout_names_the_laggards(run_dir: Path, h: Any) -> None:
    builder = h.stub(per_node={"node-0": ["--never-online"]})
    with pytest.raises(DevnetError, match=r"not online after 0.5 s: node-0 \(state joining\)"):
        async with Devnet(2, root=run_dir, node_command=builder, ready_timeout=0.5):
            pytest.fail("unreachable")
    h.assert_clean(run_dir)


async def test_cancellation_mid_start_leaves_nothing(run_dir: Path, h: Any) -> None:
    builder = h.stub(all_nodes=["--never-online"])

    def all_joining() -> bool:
        statuses = [read_status(run_dir / f"node-{i}") for i in range(3)]
        return all(s is not None and s.state == "joining" for s in statuses)

    async def cancel_when_joining(scope: trio.CancelScope) -> None:
        await h.until(all_joining)
        scope.cancel()

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_joining, scope)
            async with Devnet(3, root=run_dir, node_command=builder, ready_timeout=60):
                pytest.fail("nodes that never come online cannot finish the start")
    assert scope.cancelled_caught
    h.assert_clean(run_dir)


async def test_node_ignoring_sigterm_is_killed(run_dir: Path, h: Any) -> None:
    builder = h.stub(per_node={"node-0": ["--ignore-sigterm"]})
    async with Devnet(2, root=run_dir, node_command=builder, ready_timeout=READY,
                      stop_grace=0.3) as net:
        hung, fine = net.nodes
    h.assert_clean(run_dir)
    assert hung.returncode == -signal.SIGKILL
    assert fine.returncode == 0


async def test_second_devnet_in_the_same_root_is_refused(run_dir: Path, h: Any) -> None:
    async with Devnet(1, root=run_dir, node_command=h.stub(), ready_timeout=READY) as net:
        with pytest.raises(DevnetError, match="already running"):
            async with Devnet(1, root=run_dir, node_command=h.stub()):
                pytest.fail("unreachable")
        assert net.nodes[0].alive and net.bootstrap.alive
        assert (run_dir / "devnet.json").exists()
    h.assert_clean(run_dir)


async def test_a_stale_devnet_json_does_not_block_a_new_run(run_dir: Path, h: Any) -> None:
    async with Devnet(1, root=run_dir, node_command=h.stub(), ready_timeout=READY) as net:
        peer = net.nodes[0].peer_id
        stale = (run_dir / "devnet.json").read_text()
    (run_dir / "devnet.json").write_text(stale)  # as a crashed launcher leaves it
    async with Devnet(1, root=run_dir, node_command=h.stub(), ready_timeout=READY) as net:
        assert net.nodes[0].peer_id == peer
    h.assert_clean(run_dir)


def test_config_is_checked_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(DevnetError, match="at least one node"):
        Devnet(0, root=tmp_path)
    with pytest.raises(DevnetError, match="2 spans given for 3 nodes"):
        Devnet(3, root=tmp_path, spans=["auto", "0:2"])
    with pytest.raises(DevnetError, match="span must be"):
        Devnet(1, root=tmp_path, spans=["2:1"])
    assert list(tmp_path.iterdir()) == []


async def test_detach_leaves_processes_running_until_down(run_dir: Path, h: Any) -> None:
    async with Devnet(1, root=run_dir, node_command=h.stub(), ready_timeout=READY,
                      detach=True) as net:
        handles = [net.bootstrap, *net.nodes]
    # Released on purpose, without a "subprocess is still running" warning (warnings = errors).
    assert all(handle.alive for handle in handles)
    with pytest.raises(DevnetError, match="detached"):
        net.nodes[0].kill()
    assert h.leftover_processes(run_dir) != []
    done = await trio.run_process([sys.executable, "-m", "devnet.cli", "down", "--dir", run_dir],
                                  capture_stdout=True)
    assert b"is down" in done.stdout
    for handle in handles:  # still our children: a CLI would exit and leave them to init
        await trio.to_thread.run_sync(os.waitpid, handle.pid, 0)
    h.assert_clean(run_dir)
