"""A stand-in for ``python -m node`` that honours the devnet process contract and nothing more.

Usage: ``python stub_node.py {run|bootstrap} --data-dir D --listen /ip4/H/tcp/P [...]``, the
node CLI's argv after ``-m node``. It:

* keeps a fake but stable peer id in ``D/stub-identity`` (same data dir, same peer id);
* listens on the ``--listen`` address with a TCP echo server, so tests can probe reachability;
* writes ``D/status.json`` atomically on every state change: "joining", then "online" (a
  serving node goes online only once it has reached a bootstrap over TCP, so in ``--netns``
  mode "online" proves the namespaces are wired), "draining", "stopped";
* on SIGTERM or SIGINT drains and exits 0.

Test hooks (unknown options, like ``--link-delay-ms``, are ignored as a real node would not):
``--exit-early CODE`` (fail before online), ``--never-online`` (stay "joining"),
``--ignore-sigterm`` (a hung node, for the SIGKILL path).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

ADDR = re.compile(r"/ip4/([0-9.]+)/tcp/(\d+)(?:/p2p/.+)?")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stub_node")
    p.add_argument("command", choices=["run", "bootstrap"])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--model")
    p.add_argument("--span", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-mdns", action="store_true")
    p.add_argument("--exit-early", type=int)
    p.add_argument("--never-online", action="store_true")
    p.add_argument("--ignore-sigterm", action="store_true")
    args, _ = p.parse_known_args()
    return args


def peer_id(data_dir: Path) -> str:
    path = data_dir / "stub-identity"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("12D3KooWStub" + secrets.token_hex(10))
        os.replace(tmp, path)
    return path.read_text().strip()


def host_port(addr: str) -> tuple[str, int]:
    m = ADDR.fullmatch(addr)
    if not m:
        sys.exit(f"stub: not an /ip4/.../tcp/... multiaddr: {addr}")
    return m[1], int(m[2])


class Status:
    def __init__(self, args: argparse.Namespace, pid: str, addr: str) -> None:
        self.path = args.data_dir / "status.json"
        self.role = "bootstrap" if args.command == "bootstrap" else "node"
        self.pid = pid
        self.addrs = [f"{addr}/p2p/{pid}"]
        if self.role == "bootstrap":
            self.span = None
        elif args.span == "auto":
            self.span = [0, 4]
        else:
            self.span = [int(x) for x in args.span.split(":")]
        self.state = ""

    def write(self, state: str) -> None:
        self.state = state
        body = {"pid": os.getpid(), "role": self.role, "peer_id": self.pid, "addrs": self.addrs,
                "state": state, "span": self.span,
                "model_id": None if self.role == "bootstrap" else "stub-model",
                "stub_extra_field": "ignored by readers"}
        tmp = self.path.with_name(f".status.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.path)
        print(f"stub: {state}", flush=True)


def reach_bootstrap(addrs: list[str]) -> bool:
    for addr in addrs:
        try:
            with socket.create_connection(host_port(addr), timeout=0.3) as s:
                s.sendall(b"ping")
                if s.recv(4) == b"ping":
                    return True
        except OSError:
            continue
    return False


def main() -> int:
    args = parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    me = peer_id(args.data_dir)
    status = Status(args, me, args.listen)
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        print(f"stub: got signal {signum}", flush=True)
        stop = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_sigterm else on_signal)
    signal.signal(signal.SIGINT, on_signal)

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(host_port(args.listen))
    listener.listen()
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    print(f"stub: {args.command} {me} listening on {args.listen}", flush=True)
    status.write("joining")
    if args.exit_early is not None:
        print("stub: simulated crash: cannot load the model", file=sys.stderr, flush=True)
        return args.exit_early

    next_try = 0.0
    while not stop:
        if status.state == "joining" and not args.never_online and time.monotonic() >= next_try:
            if status.role == "bootstrap" or not args.bootstrap or reach_bootstrap(args.bootstrap):
                status.write("online")
            next_try = time.monotonic() + 0.1
        for key, _ in sel.select(timeout=0.05):
            sock = key.fileobj
            if sock is listener:
                conn, _ = listener.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data:
                sock.sendall(data)
            else:
                sel.unregister(sock)
                sock.close()
    status.write("draining")
    for key in list(sel.get_map().values()):
        sel.unregister(key.fileobj)
        key.fileobj.close()  # type: ignore[union-attr]
    status.write("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
