"""The libp2p host, configured so nothing above it meets py-libp2p's sharp edges.

Theory of operation
-------------------
:func:`open_host` builds a py-libp2p host from the node :class:`Identity` and a frozen
:class:`HostConfig`, and runs it for the duration of an ``async with`` block:

* TCP + **Noise only** (plaintext/secio/TLS are not offered) + **Yamux only**, with
  cancellation-proof, batched Noise I/O (:mod:`p2p._security`,
  :mod:`p2p._secure_session`) and yamux's hot paths rewritten (:mod:`p2p._yamux`:
  fewer scheduler trips, receive window returned at half-window, go-yamux style);
* ``max_connections_per_peer=1``, which removes libp2p's 250 ms happy-eyeballs wait
  per dial, and an auto-connector target of ``target_peers`` instead of 100;
* optional WAN emulation (``link_delay_s``, ``link_bandwidth_bps``): every connection's
  writes are delayed and paced in user space (:mod:`p2p._shaper`);
* optional private swarm: a pre-shared key (libp2p pnet) and/or a peer-id allowlist
  enforced right after the Noise handshake;
* gossipsub tuned for announcements (1 s heartbeat, raised spam limit) and a strict
  Kademlia DHT, each run as a libp2p background service inside the block;
* a bootstrap task that keeps connections to the configured bootstrap peers (retrying
  while none answers), seeds the DHT routing table, and asks them for more peers
  (:mod:`p2p._peer_exchange`) until ``target_peers`` are connected; optional mDNS;
* on exit, every connection is closed and every dialed socket too (py-libp2p would
  otherwise leak some, see :mod:`p2p._transport`).

The :class:`Host` object is the small typed API the node layer uses: peer id and
addresses, ``connect``, raw streams, framed session streams, RPC, the DHT and pubsub.
Stream handlers run in libp2p's per-connection tasks; an exception escaping one would
tear down the whole connection, so handlers are wrapped: declared :class:`P2PError`\\s
are logged (naming the peer) and the stream is reset.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, suppress
from typing import Any

import multiaddr.exceptions
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.exceptions import MultiError
from libp2p.host.exceptions import HostException
from libp2p.io.exceptions import IOException
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.protocol_muxer.exceptions import MultiselectClientError, MultiselectError
from libp2p.security.exceptions import HandshakeFailure, SecurityError
from libp2p.stream_muxer.exceptions import MuxedConnError, MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr import Multiaddr

from p2p._dht import Dht, admit_only_dht_servers
from p2p._errors import DialError, P2PError
from p2p._host_config import HostConfig, parse_peer_addr
from p2p._identity import Identity
from p2p._peer_exchange import (
    MAX_ADDRS_PER_PEER,
    PEX,
    PeerBook,
    PeerExchangeReply,
    PeerExchangeRequest,
)
from p2p._peer_id import InvalidPeerIdError, PeerId
from p2p._pubsub import PubSub, SafePubsub, make_gossipsub
from p2p._rpc import ReqT, RespT, RpcHandler, RpcSpec, rpc_request, serve_rpc_stream
from p2p._security import PskMismatchError, check_psk, libp2p_key_pair, security_options
from p2p._select import Answer, proposal
from p2p._session import SessionConfig, SessionStream, session_context
from p2p._shaper import LinkShaper
from p2p._streams import Libp2pByteStream
from p2p._transport import TrackingTCP
from p2p._yamux import FastYamux, use_fast_yamux

__all__ = ["HostConfig", "Host", "open_host", "parse_peer_addr", "StreamHandler"]

logger = logging.getLogger(__name__)

StreamHandler = Callable[[Libp2pByteStream], Awaitable[None]]
SessionHandler = Callable[[SessionStream], Awaitable[None]]

# What py-libp2p raises when a dial or stream negotiation fails (explicitly listed).
_DIAL_ERRORS: tuple[type[BaseException], ...] = (
    SwarmException,
    HostException,
    HandshakeFailure,
    SecurityError,
    MultiselectError,
    MultiselectClientError,
    MuxedConnError,
    MuxedStreamError,
    IOException,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is anywhere in ``exc``'s chain of causes (libp2p wraps a lot)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return True
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        if isinstance(current, MultiError):  # the swarm's "every address failed"
            todo.extend(current.errors)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def _to_id(peer: PeerId) -> ID:
    return ID(peer.raw)


class Host:
    """The running host. Obtain it from :func:`open_host`."""

    def __init__(
        self,
        *,
        identity: Identity,
        config: HostConfig,
        host: IHost,
        pubsub: PubSub | None,
        dht: Dht | None,
    ) -> None:
        self.identity = identity
        self.config = config
        self._host = host
        self._pubsub = pubsub
        self._dht = dht
        self._bootstrapped = trio.Event()
        self._book = PeerBook()

    # -- identity and addresses -----------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        """This node's peer id."""
        return self.identity.peer_id

    def listen_addrs(self) -> tuple[str, ...]:
        """Full multiaddrs (with ``/p2p/<id>``) others can dial, wildcards expanded."""
        out: list[str] = []
        suffix = f"/p2p/{self.peer_id}"
        for addr in self._host.get_transport_addrs():
            expanded = [addr]
            if addr.value_for_protocol("ip4") == "0.0.0.0":
                expanded = expand_wildcard_address(addr)
            out.extend(f"{a}{suffix}" for a in expanded)
        return tuple(dict.fromkeys(out))

    @property
    def libp2p(self) -> IHost:
        """The underlying py-libp2p host (escape hatch; prefer the typed API)."""
        return self._host

    # -- connections ------------------------------------------------------------------

    async def connect(self, addr: str) -> PeerId:
        """Connect to ``/.../p2p/<peer id>``; returns the peer id.

        Raises:
            DialError: bad address, unreachable, refused (wrong key, not allowed),
                or over ``dial_timeout``.
        """
        peer, transport = parse_peer_addr(addr)
        await self.connect_peer(peer, [transport])
        return peer

    async def connect_peer(self, peer: PeerId, addrs: Sequence[str]) -> None:
        """Connect to ``peer`` at any of ``addrs`` (transport multiaddrs).

        Raises:
            DialError: as :meth:`connect`.
        """
        if peer == self.peer_id:
            raise DialError("refusing to dial ourselves")
        try:
            maddrs = [Multiaddr(a) for a in addrs]
        except (multiaddr.exceptions.Error, ValueError) as exc:
            raise DialError(f"bad address for {peer.short()}: {exc}") from exc
        # py-libp2p refuses, for 60 s and without trying, to dial a peer whose addresses all
        # failed once. A node restarted in seconds on the same address was then out of reach
        # for a minute. This dial is deliberate (callers back off on their own), so it tries.
        unblock = getattr(self._host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(_to_id(peer))
        try:
            with trio.fail_after(self.config.dial_timeout):
                await self._host.connect(PeerInfo(_to_id(peer), maddrs))
        except _DIAL_ERRORS as exc:
            if _caused_by(exc, PskMismatchError):
                raise DialError(f"cannot connect to {peer}: pre-shared key mismatch") from exc
            raise DialError(f"cannot connect to {peer}: {exc!r}") from exc
        if self._dht is not None:
            await self._dht.add_server(_to_id(peer))

    def connected_peers(self) -> list[PeerId]:
        """Peers with a live connection, sorted."""
        out: list[PeerId] = []
        for pid in self._host.get_connected_peers():
            try:
                out.append(PeerId.from_bytes(pid.to_bytes()))
            except InvalidPeerIdError:
                continue
        return sorted(out)

    def is_connected(self, peer: PeerId) -> bool:
        """Whether a connection to ``peer`` is up."""
        return bool(self._host.get_network().connections.get(_to_id(peer)))

    async def disconnect(self, peer: PeerId) -> None:
        """Close all connections to ``peer``."""
        try:
            await self._host.disconnect(_to_id(peer))
        except _DIAL_ERRORS as exc:
            logger.debug("disconnect from %s: %r", peer, exc)

    async def wait_bootstrapped(self) -> None:
        """Return once at least one bootstrap peer has been reached (or none is set)."""
        await self._bootstrapped.wait()

    # -- raw streams ------------------------------------------------------------------

    async def open_stream(self, peer: PeerId, protocol: str) -> Libp2pByteStream:
        """Open a stream to ``peer`` speaking ``protocol`` (connecting if needed).

        Raises:
            DialError: no connection, protocol not supported, or over ``dial_timeout``.
        """
        try:
            with trio.fail_after(self.config.dial_timeout):
                stream = await self._host.new_stream(_to_id(peer), [TProtocol(protocol)])
        except _DIAL_ERRORS as exc:
            raise DialError(f"cannot open {protocol} to {peer}: {exc!r}") from exc
        return Libp2pByteStream(stream)

    async def open_stream_lazily(self, peer: PeerId, protocol: str) -> Libp2pByteStream:
        """Like :meth:`open_stream`, without waiting for the protocol's negotiation: the
        proposal goes out at once and the stream's first read checks the answer
        (`p2p/_select.py`). Saves two round trips; a peer that does not speak ``protocol``
        shows as a :class:`RemoteProtocolError` on that read instead of a ``DialError`` here.

        Raises:
            DialError: no connection, or over ``dial_timeout``.
        """
        try:
            with trio.fail_after(self.config.dial_timeout):
                stream = await self._host.get_network().new_stream(_to_id(peer))
                stream.set_protocol(TProtocol(protocol))
                await stream.write(proposal(protocol))
        except _DIAL_ERRORS as exc:
            raise DialError(f"cannot open {protocol} to {peer}: {exc!r}") from exc
        return Libp2pByteStream(stream, answer=Answer(protocol))

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve inbound streams of ``protocol`` with ``handler``.

        The handler owns the stream; a :class:`P2PError` escaping it is logged with the
        peer id and the stream is reset; the connection's other streams are unaffected.
        """

        async def run(net_stream: INetStream) -> None:
            stream = Libp2pByteStream(net_stream)
            try:
                await handler(stream)
            except P2PError as exc:
                logger.info("%s handler for peer %s ended: %r", protocol, stream.remote_peer, exc)
                await stream.reset()

        self._host.set_stream_handler(TProtocol(protocol), run)

    def remove_stream_handler(self, protocol: str) -> None:
        """Stop serving ``protocol``."""
        self._host.remove_stream_handler(TProtocol(protocol))

    # -- sessions and RPC -------------------------------------------------------------

    @asynccontextmanager
    async def open_session(
        self, peer: PeerId, protocol: str, *, config: SessionConfig | None = None
    ) -> AsyncIterator[SessionStream]:
        """A :class:`SessionStream` to ``peer`` for the duration of the block.

        The stream is opened lazily (:meth:`open_stream_lazily`): a peer that does not speak
        ``protocol`` fails the session's first receive with a :class:`RemoteProtocolError`.

        Raises:
            DialError: the stream could not be opened.
        """
        stream = await self.open_stream_lazily(peer, protocol)
        async with session_context(
            stream, config=config or SessionConfig(), protocol=protocol
        ) as session:
            yield session

    def set_session_handler(
        self, protocol: str, handler: SessionHandler, *, config: SessionConfig | None = None
    ) -> None:
        """Serve inbound session streams of ``protocol``.

        The session closes cleanly when ``handler`` returns and is reset if it raises.
        """
        cfg = config or SessionConfig()

        async def run(stream: Libp2pByteStream) -> None:
            async with session_context(stream, config=cfg, protocol=protocol) as session:
                await handler(session)

        self.set_stream_handler(protocol, run)

    async def request(self, peer: PeerId, spec: RpcSpec[ReqT, RespT], request: ReqT) -> RespT:
        """One RPC round trip (see :func:`p2p.rpc_request`)."""
        return await rpc_request(self, peer, spec, request)

    def set_rpc_handler(self, spec: RpcSpec[Any, Any], handler: RpcHandler) -> None:
        """Serve ``spec`` with ``handler`` (see :func:`p2p.serve_rpc_stream`)."""

        async def run(stream: Libp2pByteStream) -> None:
            await serve_rpc_stream(stream, spec, handler)

        self.set_stream_handler(spec.protocol, run)

    # -- DHT and pubsub -------------------------------------------------------------

    @property
    def dht(self) -> Dht | None:
        """The Kademlia DHT, or None when disabled."""
        return self._dht

    @property
    def pubsub(self) -> PubSub | None:
        """Gossipsub, or None when disabled."""
        return self._pubsub

    # -- background services --------------------------------------------------------

    async def _bootstrap(self, addrs: Sequence[str]) -> None:
        """Keep the bootstrap peers connected, then grow to ``target_peers`` via PEX."""
        targets: list[tuple[PeerId, str]] = []
        for text in addrs:
            try:
                peer, transport = parse_peer_addr(text)
            except DialError as exc:
                logger.warning("ignoring bootstrap address: %s", exc)
                continue
            if peer != self.peer_id:
                targets.append((peer, transport))
        if not targets:
            self._bootstrapped.set()
            return
        while True:
            reached: list[PeerId] = []
            for peer, transport in targets:
                if not self.is_connected(peer):
                    try:
                        await self.connect_peer(peer, [transport])
                    except DialError as exc:
                        logger.info("bootstrap peer %s unreachable: %s", peer.short(), exc)
                        continue
                reached.append(peer)
            if reached:
                await self._exchange_peers(reached)
                self._bootstrapped.set()
            cfg = self.config
            await trio.sleep(cfg.bootstrap_check if reached else cfg.bootstrap_retry)

    async def _serve_pex(self, peer: PeerId, request: PeerExchangeRequest) -> PeerExchangeReply:
        self._book.learn(peer, request.addrs)
        sample = self._book.sample(request.want, exclude=peer, keep=self.is_connected)
        return PeerExchangeReply(peers=tuple(sample))

    async def _exchange_peers(self, sources: Sequence[PeerId]) -> None:
        """Ask ``sources`` for peers and dial some until ``target_peers`` are connected."""
        if len(self.connected_peers()) >= self.config.target_peers:
            return
        # A host that serves nothing (a client) asks without offering itself: peers handed
        # its address would dial it and query a DHT it does not serve.
        offer = self.listen_addrs()[:MAX_ADDRS_PER_PEER] if self.config.dht_server else ()
        mine = PeerExchangeRequest(addrs=offer)
        for source in sources:
            try:
                reply = await self.request(source, PEX, mine)
            except P2PError as exc:  # best effort: any failure just means no hints
                logger.info("peer exchange with %s failed: %r", source.short(), exc)
                continue
            for record in reply.peers:
                if record.peer != self.peer_id:
                    self._book.learn(record.peer, record.addrs)
        missing = self.config.target_peers - len(self.connected_peers())
        candidates = self._book.sample(
            missing, exclude=self.peer_id, keep=lambda p: not self.is_connected(p)
        )
        limiter = trio.CapacityLimiter(4)

        async def dial(peer: PeerId, addrs: tuple[str, ...]) -> None:
            async with limiter:
                try:
                    await self.connect_peer(peer, addrs)
                except DialError as exc:
                    logger.info("peer %s from exchange unreachable: %s", peer.short(), exc)

        async with trio.open_nursery() as nursery:
            for record in candidates:
                nursery.start_soon(dial, record.peer, record.addrs)

    async def _discovered(self, receive: trio.MemoryReceiveChannel[PeerInfo]) -> None:
        async for info in receive:
            try:
                peer = PeerId.from_bytes(info.peer_id.to_bytes())
            except InvalidPeerIdError:
                continue
            if peer == self.peer_id or self.is_connected(peer):
                continue
            try:
                await self.connect_peer(peer, [str(a) for a in info.addrs])
                logger.info("connected to LAN peer %s found by mDNS", peer.short())
            except DialError as exc:
                logger.info("mDNS peer %s unreachable: %s", peer.short(), exc)


@asynccontextmanager
async def _discovery_bridge(host: Host, nursery: trio.Nursery) -> AsyncIterator[None]:
    """Forward libp2p's (process-global, maybe foreign-thread) discovery events."""
    send, receive = trio.open_memory_channel[PeerInfo](64)
    token = trio.lowlevel.current_trio_token()

    def push(info: PeerInfo) -> None:
        def deliver() -> None:
            # Discovery is best effort: a full queue drops; the peer is re-announced.
            with suppress(trio.WouldBlock, trio.ClosedResourceError):
                send.send_nowait(info)

        with suppress(trio.RunFinishedError):
            token.run_sync_soon(deliver)

    peerDiscovery.register_peer_discovered_handler(push)
    nursery.start_soon(host._discovered, receive)
    try:
        yield
    finally:
        peerDiscovery.unregister_peer_discovered_handler(push)
        send.close()


async def _disconnect_all(lp_host: IHost) -> None:
    """Close every connection before the swarm stops, all at once.

    py-libp2p 0.8.1 leaks the dialer's TCP socket (a ResourceWarning) when a host is
    stopped with connections still open; closing them first avoids it. Two things of its
    make that slow: each connection's close sleeps 0.1 s (`SwarmConn._cleanup`), so the
    closes run side by side; and below its minimum of connections its connection manager
    dials every known peer again, so it is stopped first. A client with eight peers took
    0.8 s to leave before.
    """
    connector = getattr(lp_host.get_network(), "auto_connector", None)
    if connector is not None:
        await connector.stop()

    async def disconnect(peer: ID) -> None:
        try:
            await lp_host.disconnect(peer)
        except _DIAL_ERRORS as exc:
            logger.debug("closing connection to %s at shutdown: %r", peer, exc)

    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        async with trio.open_nursery() as nursery:
            for peer in list(lp_host.get_connected_peers()):
                nursery.start_soon(disconnect, peer)


async def _close_listeners(lp_host: IHost) -> None:
    """Close the host's listening sockets.

    py-libp2p 0.8.1 closes them only at the end of its swarm's stop, after awaits that a
    cancelled stop never gets past, so every host left its port open (and accepting) after
    it stopped: a socket per `Client` for the life of the process.
    """
    listeners = list(getattr(lp_host.get_network(), "listeners", {}).values())
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        for listener in listeners:
            # Out of the list before they close: a peer's identify request reads every
            # listed socket's address at any moment, and a closed one raises EBADF there,
            # which fails the whole host. py-libp2p's own close unlists them only after.
            sockets = list(getattr(listener, "listeners", ()))
            if sockets:
                listener.listeners.clear()
            try:
                await listener.close()
                for sock in sockets:
                    await sock.aclose()
            except OSError as exc:
                logger.debug("closing a listener at shutdown: %r", exc)


def open_host(identity: Identity, config: HostConfig) -> AbstractAsyncContextManager[Host]:
    """Start a host; it stops when the block exits.

    Raises:
        DialError: a listen address is malformed or cannot be bound.
    """
    return _open_host(identity, config)


@asynccontextmanager
async def _open_host(identity: Identity, config: HostConfig) -> AsyncIterator[Host]:
    try:
        listen = [Multiaddr(a) for a in config.listen_addrs]
    except (multiaddr.exceptions.Error, ValueError) as exc:
        raise DialError(f"bad listen address: {exc}") from exc
    key_pair = libp2p_key_pair(identity)
    tcp = TrackingTCP()
    shaper = LinkShaper(delay_s=config.link_delay_s, bandwidth_bps=config.link_bandwidth_bps)
    lp_host = new_host(
        transports=[tcp],
        key_pair=key_pair,
        sec_opt=security_options(key_pair, config.allowed_peers, shaper),
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): FastYamux},
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            min_connections=config.target_peers,
            low_watermark=config.target_peers,
        ),
        psk=None if config.psk is None else config.psk.hex(),
        enable_mDNS=config.enable_mdns,
        listen_addrs=listen,
    )
    use_fast_yamux(lp_host)
    if config.psk is not None:
        check_psk(lp_host)
    # The block's own exception is caught here and re-raised after every libp2p
    # service has shut down, so it is not wrapped in their nurseries' ExceptionGroups.
    body_error: Exception | None = None
    async with AsyncExitStack() as stack:
        stack.callback(tcp.close_leftovers)
        if shaper.enabled:
            # Shaped links' pumps: entered before the host runs, so it outlives every
            # connection; cancelled once they are all closed (or leaked by libp2p).
            links = await stack.enter_async_context(trio.open_nursery())
            stack.callback(links.cancel_scope.cancel)
            shaper.bind(links)
        try:
            await stack.enter_async_context(lp_host.run(listen))
        except OSError as exc:
            raise DialError(f"cannot listen on {config.listen_addrs}: {exc}") from exc
        stack.push_async_callback(_close_listeners, lp_host)
        stack.push_async_callback(_disconnect_all, lp_host)
        pubsub: PubSub | None = None
        if config.enable_pubsub:
            router = make_gossipsub(config.gossip)
            lp_pubsub = SafePubsub(lp_host, router)
            await stack.enter_async_context(background_trio_service(lp_pubsub))
            await stack.enter_async_context(background_trio_service(router))
            await lp_pubsub.wait_until_ready()
            pubsub = PubSub(lp_pubsub, router, config.gossip)
        dht: Dht | None = None
        if config.enable_dht:
            mode = DHTMode.SERVER if config.dht_server else DHTMode.CLIENT
            kad = KadDHT(lp_host, mode, strict_validation=True)
            add_unchecked = admit_only_dht_servers(kad)
            await stack.enter_async_context(background_trio_service(kad))
            dht = Dht(kad, add_unchecked=add_unchecked)
        host = Host(identity=identity, config=config, host=lp_host, pubsub=pubsub, dht=dht)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        if config.enable_mdns:
            await stack.enter_async_context(_discovery_bridge(host, nursery))
        host.set_rpc_handler(PEX, host._serve_pex)
        nursery.start_soon(host._bootstrap, config.bootstrap)
        logger.info("host %s listening on %s", identity.peer_id, ", ".join(host.listen_addrs()))
        try:
            yield host
        except Exception as exc:  # noqa: BLE001 - not handled: re-raised below, unwrapped
            body_error = exc
    if body_error is not None:
        raise body_error
