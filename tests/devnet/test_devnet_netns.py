"""``--netns`` mode: own namespace and address per process, cut off / reconnect, cleanup."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from devnet import Devnet, DevnetError, NetnsPlan, read_status
from devnet._netns import check_support

NETNS_OK = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") is not None
needs_netns = pytest.mark.skipif(
    not NETNS_OK, reason="network namespaces need root and iproute2; covered where available"
)
READY = 20.0

# Connect to HOST:PORT (argv) within 1 s and expect the stub's echo; exit 0 iff it worked.
PROBE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0) as s:
        s.sendall(b"hi")
        sys.exit(0 if s.recv(2) == b"hi" else 1)
except OSError:
    sys.exit(1)
"""


async def reachable(namespace: str, listen: str) -> bool:
    """Whether the stub listening on ``listen`` answers from inside ``namespace``."""
    host, port = listen.split("/")[2], listen.split("/")[4]
    done = await trio.run_process(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", PROBE, host, port],
        check=False, capture_stdout=True, capture_stderr=True,
    )
    return done.returncode == 0


def test_plan_names_fit_linux_limits() -> None:
    plan = NetnsPlan(tag="0a1b2c", subnet=7, nodes=200)
    assert plan.bridge == "snb0a1b2c"
    assert plan.namespace(None) == "shardnet-0a1b2c-boot"
    assert plan.namespace(3) == "shardnet-0a1b2c-n3"
    assert max(len(plan.veth(i)) for i in plan.members) <= 15  # IFNAMSIZ - 1
    assert plan.address(None) == "10.77.7.2" and plan.gateway == "10.77.7.1"
    assert [plan.address(i) for i in range(2)] == ["10.77.7.10", "10.77.7.11"]
    assert plan.address(199) == "10.77.7.209"
    with pytest.raises(DevnetError, match="1..200 nodes"):
        NetnsPlan(tag="0a1b2c", subnet=0, nodes=201)
    assert NetnsPlan.tag_for(Path("/a")) == NetnsPlan.tag_for(Path("/a"))
    assert NetnsPlan.tag_for(Path("/a")) != NetnsPlan.tag_for(Path("/b"))


def test_netns_without_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(DevnetError, match=r"--netns needs root and iproute2 \(ip netns\)"):
        check_support()


async def test_netns_without_root_leaves_nothing(
    run_dir: Path, h: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(DevnetError, match="needs root"):
        async with Devnet(1, root=run_dir, netns=True, node_command=h.stub()):
            pytest.fail("unreachable")
    h.assert_clean(run_dir)


@needs_netns
async def test_own_addresses_cut_off_and_reconnect(run_dir: Path, h: Any) -> None:
    tag = NetnsPlan.tag_for(run_dir)
    # What a crashed earlier run of this run directory would have left behind.
    await trio.run_process(["ip", "netns", "add", f"shardnet-{tag}-n7"])
    async with Devnet(2, root=run_dir, netns=True, node_command=h.stub(),
                      ready_timeout=READY) as net:
        plan = net.netns_plan
        assert plan is not None and plan.tag == tag
        assert not await trio.Path(f"/run/netns/shardnet-{tag}-n7").exists()  # stale one removed
        boot, (a, b) = net.bootstrap, net.nodes
        assert boot.listen == f"/ip4/{plan.address(None)}/tcp/4001"
        for i, node in enumerate(net.nodes):
            assert node.netns == plan.namespace(i)
            assert node.listen == f"/ip4/{plan.address(i)}/tcp/4001"
            status = read_status(node.data_dir)
            assert status is not None and status.pid == node.pid  # ip netns exec execs
            assert status.addrs[0].startswith(f"/ip4/{plan.address(i)}/tcp/4001/p2p/")
        assert a.listen != b.listen
        # "online" already proved each stub reached the bootstrap; probe it explicitly too.
        assert await reachable(a.netns or "", boot.listen)
        assert await reachable(b.netns or "", boot.listen)
        assert await reachable(b.netns or "", a.listen)

        await a.cut_off()
        assert not await reachable(a.netns or "", boot.listen)
        assert not await reachable(b.netns or "", a.listen)
        assert await reachable(b.netns or "", boot.listen)  # only a is cut off
        assert a.alive

        await a.reconnect()
        await h.until(lambda: reachable(a.netns or "", boot.listen))
        assert await reachable(b.netns or "", a.listen)
    h.assert_clean(run_dir)
