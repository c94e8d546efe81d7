"""Laptop life: a node that slept notices (pure clock-jump detector), re-announces at once and
re-dials the bootstrap peers it lost."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from node._daemon import (
    ClockJump,
    ClockReading,
    Clocks,
    NodeConfig,
    RunningNode,
    detect_clock_jump,
    run_node,
    watch_clock,
)
from p2p import parse_peer_addr

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` (the caller bounds the wait with `fail_after`)."""
    while True:
        if condition():
            return
        await trio.sleep(0.05)


def jump(wall: float, mono: float, *, interval: float = 1.0) -> ClockJump | None:
    before = ClockReading(wall=1_700_000_000.0, mono=5_000.0)
    after = ClockReading(wall=before.wall + wall, mono=before.mono + mono)
    return detect_clock_jump(before, after, interval_s=interval, threshold_s=5.0)


def test_an_ordinary_tick_is_not_a_jump() -> None:
    assert jump(1.0, 1.0) is None
    assert jump(1.3, 1.29) is None  # NTP slewing, a little scheduling noise
    assert jump(4.0, 4.0) is None  # a tick 3 s late under load: within the threshold


def test_suspend_moves_only_the_wall_clock() -> None:
    # Linux: CLOCK_MONOTONIC stops while suspended, the wall clock does not.
    found = jump(3600.0, 1.0)
    assert found == ClockJump(wall_s=3600.0, mono_s=1.0)
    assert found.away_s == 3599.0


def test_a_stopped_process_moves_both_clocks_past_the_tick() -> None:
    found = jump(60.0, 60.0)  # SIGSTOP / SIGCONT, or a clock that counts suspend
    assert found is not None and found.away_s == 60.0
    assert jump(6.5, 6.5) is not None and jump(5.9, 5.9) is None  # interval 1 + threshold 5


def test_a_wall_clock_step_counts_too() -> None:
    # An NTP step backwards: announcement expiries are wall-clock, so they need renewing.
    assert jump(-30.0, 1.0) is not None


def test_bad_readings_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        jump(math.nan, 1.0)
    with pytest.raises(ValueError, match="> 0"):
        jump(1.0, 1.0, interval=0.0)


async def test_the_watch_calls_back_once_per_jump(autojump_clock: trio.testing.MockClock
                                                  ) -> None:
    offset = [0.0]
    seen: list[ClockJump] = []

    async def on_jump(found: ClockJump) -> None:
        seen.append(found)

    def wall() -> float:
        return 1_700_000_000.0 + trio.current_time() + offset[0]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: watch_clock(interval_s=1.0, threshold_s=5.0, on_jump=on_jump,
                                               wall=wall, mono=trio.current_time))
        await trio.sleep(10.5)
        assert seen == []
        offset[0] += 7200.0  # the lid closes for two hours
        await trio.sleep(1.0)
        assert [round(j.away_s) for j in seen] == [7200]
        await trio.sleep(10.0)  # one jump, one call
        assert len(seen) == 1
        nursery.cancel_scope.cancel()


async def test_a_slow_reaction_is_not_taken_for_another_jump(
        autojump_clock: trio.testing.MockClock) -> None:
    offset = [0.0]
    seen: list[ClockJump] = []

    async def on_jump(found: ClockJump) -> None:
        seen.append(found)
        await trio.sleep(20.0)  # e.g. dialing an unreachable bootstrap until its timeout

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: watch_clock(
            interval_s=1.0, threshold_s=5.0, on_jump=on_jump,
            wall=lambda: trio.current_time() + offset[0], mono=trio.current_time))
        await trio.sleep(2.5)
        offset[0] += 600.0
        await trio.sleep(60.0)
        assert len(seen) == 1
        nursery.cancel_scope.cancel()


async def test_a_node_that_woke_up_reannounces_and_redials(tmp_path: Path,
                                                           tiny_model: Path) -> None:
    offset = [0.0]
    clocks = Clocks(wall=lambda: time.time() + offset[0])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            boot: RunningNode = await nursery.start(lambda task_status: run_node(
                NodeConfig(data_dir=tmp_path / "boot", listen=LOOPBACK, mdns=False),
                role="bootstrap", task_status=task_status))
            boot_addr = boot.host.listen_addrs()[0]
            boot_peer, _ = parse_peer_addr(boot_addr)
            # Re-announcing on the timer only every minute: any new record is the wake-up's.
            config = NodeConfig(data_dir=tmp_path / "n0", model=tiny_model, span="0:6",
                                listen=LOOPBACK, bootstrap=(boot_addr,), mdns=False,
                                announce_interval_s=60, announce_ttl_s=90,
                                wake_check_interval_s=0.05)

            async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                await run_node(config, clocks=clocks, task_status=task_status)

            node: RunningNode = await nursery.start(run)
            assert node.announcer is not None and node.announcer.last is not None
            await until(lambda: node.host.is_connected(boot_peer))
            # The Wi-Fi went away with the lid closed: the connection is gone.
            await node.host.disconnect(boot_peer)
            await until(lambda: not node.host.is_connected(boot_peer))
            before = node.announcer.last
            await trio.sleep(0.3)
            assert node.announcer.last is before and node.wakes == 0  # nothing without a jump
            assert not node.host.is_connected(boot_peer)  # the host's own retry is 30 s away

            offset[0] += 3600.0  # the lid opens an hour later
            await until(lambda: node.wakes == 1 and node.host.is_connected(boot_peer))
            after = node.announcer.last
            assert after is not None and after.seq > before.seq
            assert after.expires_at >= time.time() + 80  # a fresh expiry, not the old one
            assert after.state == before.state and (after.start, after.end) == (0, 6)
            status_file = tmp_path / "n0" / "status.json"
            await until(lambda: json.loads(status_file.read_text())["wakes"] == 1)
            status = json.loads(status_file.read_text())
            assert status["state"] == "online" and status["rebalances"] == 0
            assert node.wakes == 1
            nursery.cancel_scope.cancel()
