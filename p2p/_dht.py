"""A typed adapter over py-libp2p's Kademlia DHT.

Quirks absorbed here (measured on 0.8.1):

* Without ``strict_validation=True`` any peer can store anything under any key; we
  always run strict, and every namespace has a typed :class:`RecordValidator`.
* Values live 24 h with no TTL parameter: validators must reject expired records
  themselves (announcements carry an expiry).
* ``get_value`` without a quorum waits for *every* queried peer (10 s per silent one);
  we ask with ``quorum=1`` and the caller bounds the wait.
* ``find_providers`` may return duplicates; we deduplicate.
* The DHT logs a WARNING for every closed RPC stream; that is libp2p's noise, not ours.

Errors from libp2p (a zoo: ValueError, InvalidRecordType, stream errors...) are
mapped to :class:`LocalProtocolError` (our put was refused by our own validator) or
:class:`DhtError`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import Validator

from p2p._errors import LocalProtocolError, P2PError, RemoteProtocolError
from p2p._peer_id import InvalidPeerIdError, PeerId

__all__ = ["Dht", "DhtError", "RecordValidator", "admit_only_dht_servers"]

logger = logging.getLogger(__name__)


class DhtError(P2PError):
    """A DHT operation failed for a reason other than our own validation."""


class RecordValidator(Protocol):
    """Validation and conflict resolution for one key namespace."""

    def validate(self, key: str, value: bytes) -> None:
        """Raise :class:`RemoteProtocolError` if ``value`` is not acceptable under ``key``."""
        ...

    def select(self, key: str, values: list[bytes]) -> int:
        """Index of the best of several *valid* values for ``key``."""
        ...


class _ValidatorAdapter(Validator):
    """Presents a typed :class:`RecordValidator` to libp2p."""

    def __init__(self, inner: RecordValidator) -> None:
        self._inner = inner

    def validate(self, key: str, value: bytes) -> None:
        try:
            self._inner.validate(key, value)
        except RemoteProtocolError as exc:
            logger.info("DHT record rejected for %s: %s", key, exc)
            # libp2p treats ValueError as "invalid record" in every code path.
            raise ValueError(str(exc)) from exc

    def select(self, key: str, values: list[bytes]) -> int:
        return self._inner.select(key, values)


# What KadDHT raises for network trouble during a lookup or store.
_DHT_ERRORS: tuple[type[BaseException], ...] = (
    InvalidRecordType,
    ValueError,
    KeyError,
    OSError,
    RuntimeError,
)


AddPeer = Callable[..., Awaitable[bool]]
"""A routing table's `add_peer(peer, *, skip_server_mode_check=False) -> added`."""


def admit_only_dht_servers(kad: KadDHT) -> AddPeer:
    """Let into ``kad``'s routing table only peers that said they serve the DHT.

    Kademlia's rule is to keep only server-mode peers; py-libp2p 0.8.1 also adds any peer
    that sends it a query, and any peer it has not identified yet, so a client that asked
    once stayed in every table it touched after it left, and newcomers were handed its
    address and dialed it (measured: after five clients had come and gone, a sixth dialed
    eight peers, six of them gone). Here a peer goes in only when identify has listed the
    DHT's protocol among the ones it serves; one that speaks to us again after identify
    goes in then. Returns the table's own `add_peer`, which admits unchecked (for
    :meth:`Dht.add_server`: peers we dialed ourselves).
    """
    table = kad.routing_table
    admit = table.add_peer
    peerstore = kad.host.get_peerstore()

    async def add_peer(peer: PeerInfo | ID, *, skip_server_mode_check: bool = False) -> bool:
        peer_id = peer.peer_id if isinstance(peer, PeerInfo) else peer
        try:
            serves = str(KAD_PROTOCOL) in (peerstore.get_protocols(peer_id) or ())
        except PeerStoreError:  # a peer it has never seen
            serves = False
        return serves and await admit(peer, skip_server_mode_check=True)

    table.add_peer = add_peer  # type: ignore[method-assign,assignment]
    return admit


class Dht:
    """Put/get signed records and provider records, with strict validation."""

    def __init__(self, kad: KadDHT, *, add_unchecked: AddPeer | None = None) -> None:
        self._kad = kad
        self._add_unchecked = add_unchecked or kad.routing_table.add_peer

    async def add_server(self, peer: ID) -> bool:
        """Put ``peer`` in the routing table without asking identify (a peer we dialed)."""
        return await self._add_unchecked(peer, skip_server_mode_check=True)

    @property
    def kad(self) -> KadDHT:
        """The underlying libp2p object (escape hatch for diagnostics)."""
        return self._kad

    def register_validator(self, namespace: str, validator: RecordValidator) -> None:
        """Accept keys ``/<namespace>/...``, validated by ``validator``."""
        self._kad.register_validator(namespace, _ValidatorAdapter(validator))

    async def put(self, key: str, value: bytes) -> None:
        """Store ``value`` locally and at the closest peers.

        Raises:
            LocalProtocolError: our own validator refused it (bad or stale record).
        """
        try:
            await self._kad.put_value(key, value)
        except (InvalidRecordType, ValueError) as exc:
            raise LocalProtocolError(f"DHT refused our record for {key}: {exc}") from exc

    async def get(self, key: str) -> bytes | None:
        """The best valid value for ``key``, or None. Bound it with ``trio.fail_after``.

        Raises:
            DhtError: the lookup failed.
        """
        try:
            return await self._kad.get_value(key, quorum=1)
        except _DHT_ERRORS as exc:
            raise DhtError(f"DHT get {key} failed: {exc!r}") from exc

    async def provide(self, key: str) -> None:
        """Advertise that this node provides ``key``."""
        try:
            await self._kad.provide(key)
        except _DHT_ERRORS as exc:
            raise DhtError(f"DHT provide {key} failed: {exc!r}") from exc

    async def find_providers(self, key: str, count: int = 20) -> list[PeerId]:
        """Distinct providers of ``key`` (sorted)."""
        try:
            infos = await self._kad.find_providers(key, count)
        except _DHT_ERRORS as exc:
            raise DhtError(f"DHT find_providers {key} failed: {exc!r}") from exc
        found: set[PeerId] = set()
        for info in infos:
            try:
                found.add(PeerId.from_bytes(info.peer_id.to_bytes()))
            except InvalidPeerIdError:
                continue
        return sorted(found)

    def routing_table_size(self) -> int:
        """Peers in the routing table."""
        return self._kad.get_routing_table_size()
