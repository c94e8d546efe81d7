"""Connection security for the host: Noise only, fast atomic sessions, optional allowlist.

* **Plaintext offered by default.** ``new_host`` offers plaintext, secio and TLS next to
  Noise unless told otherwise, so a plaintext-only peer would get an unauthenticated,
  unencrypted connection. We pass a security map holding only :class:`SafeNoise`.
* **The transport session.** :class:`SafeNoise` hands the muxer a
  :class:`~p2p._secure_session.NoiseSession` instead of py-libp2p's: its writes cannot
  be torn by cancellation (a torn write kills the whole connection), and it moves
  bytes with a fraction of the socket calls and scheduler trips.
* **WAN emulation.** With a :class:`~p2p._shaper.LinkShaper` enabled, every write
  of a connection goes through a :class:`~p2p._shaper.ShapedWriter` (delay and
  bandwidth per connection, FIFO); its pump performs the session's atomic writes.
* **Private swarms.** With an allowlist, :class:`SafeNoise` refuses any authenticated
  peer not on it, in both directions, before a single stream exists. A pre-shared key
  (libp2p's pnet) is the coarser alternative, applied by the swarm below the handshake.
  pnet has no key check of its own: with different keys each side decrypts the other's
  first message to noise, and py-libp2p then waits for the length that noise announces
  until the dial times out. Every libp2p peer's first message is multistream-select's
  header, so :func:`check_psk` makes each side compare the first bytes it decrypts
  against it and fail at the first wrong byte with :class:`PskMismatchError`.
"""

from __future__ import annotations

import logging
from collections.abc import Set

import trio
from libp2p.abc import IHost, IRawConnection, ISecureConn
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol, TSecurityOptions
from libp2p.io.exceptions import IOException
from libp2p.network.connection.exceptions import RawConnError
from libp2p.peer.id import ID
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.pnet.psk_conn import PskConn
from libp2p.security.secure_session import SecureSession
from libp2p.security.security_multistream import SecurityMultistream

from p2p._identity import Identity
from p2p._peer_id import PeerId
from p2p._secure_session import WRITE_STALL_TIMEOUT, NoiseSession
from p2p._shaper import LinkShaper

__all__ = [
    "PskMismatchError",
    "SafeNoise",
    "WRITE_STALL_TIMEOUT",
    "check_psk",
    "libp2p_key_pair",
    "security_options",
]

logger = logging.getLogger(__name__)


def libp2p_key_pair(identity: Identity) -> KeyPair:
    """The identity's key in libp2p's types (same seed, hence the same peer id)."""
    private = Ed25519PrivateKey.new(identity.seed())
    return KeyPair(private, private.get_public_key())


# What a write on a dead connection raises (ends a shaped link's pump quietly).
_WRITE_BROKEN: tuple[type[BaseException], ...] = (
    IOException,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def _session(conn: ISecureConn, shaper: LinkShaper | None) -> ISecureConn:
    if not isinstance(conn, SecureSession):
        return conn
    session = NoiseSession(
        local_peer=conn.local_peer,
        local_private_key=conn.local_private_key,
        remote_peer=conn.remote_peer,
        remote_permanent_pubkey=conn.remote_permanent_pubkey,
        is_initiator=conn.is_initiator,
        conn=conn.conn,
    )
    if shaper is not None:
        session.shaped = shaper.link(
            session.write_now, broken=_WRITE_BROKEN, name=f"link to {conn.remote_peer}"
        )
    return session


class SafeNoise(NoiseTransport):
    """Noise with our transport session, optional link shaping and peer allowlist."""

    def __init__(
        self,
        key_pair: KeyPair,
        allowed: Set[PeerId] | None = None,
        shaper: LinkShaper | None = None,
    ) -> None:
        super().__init__(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self._allowed = None if allowed is None else frozenset(p.raw for p in allowed)
        self._shaper = shaper

    async def _check(self, conn: ISecureConn) -> ISecureConn:
        remote: ID = conn.get_remote_peer()
        if self._allowed is not None and remote.to_bytes() not in self._allowed:
            logger.warning("refused connection with peer %s: not on the allowlist", remote)
            await conn.close()
            raise HandshakeFailure(f"peer {remote} is not on the allowlist")
        try:
            return _session(conn, self._shaper)
        except trio.ClosedResourceError as exc:  # the host is stopping
            await conn.close()
            raise HandshakeFailure(f"not accepting connections: {exc}") from exc

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return await self._check(await super().secure_inbound(conn))

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return await self._check(await super().secure_outbound(conn, peer_id))


def security_options(
    key_pair: KeyPair, allowed: Set[PeerId] | None, shaper: LinkShaper | None = None
) -> TSecurityOptions:
    """The security map to pass to ``new_host``: Noise, and nothing else."""
    return {TProtocol(NOISE_PROTOCOL_ID): SafeNoise(key_pair, allowed, shaper)}


# The first bytes every libp2p peer sends on a new connection: multistream-select's
# header, a varint length (19) and the protocol id.
_FIRST_MESSAGE = b"\x13/multistream/1.0.0\n"


class PskMismatchError(RawConnError):
    """The peer's first bytes do not decrypt to libp2p's first message: another key."""


class _CheckedPskConn(PskConn):
    """py-libp2p's pnet connection, checking the first bytes it decrypts."""

    def __init__(self, conn: IRawConnection, psk: str) -> None:
        super().__init__(conn, psk)
        self._expect = _FIRST_MESSAGE
        self._address = conn.get_remote_address()  # for the log line, while it is known

    async def read(self, n: int | None = None) -> bytes:
        data = await super().read(n)
        if self._expect and data:
            seen = min(len(data), len(self._expect))
            if data[:seen] != self._expect[:seen]:
                logger.warning("connection with %s refused: pre-shared key mismatch", self._address)
                await self.close()
                raise PskMismatchError(f"pre-shared key mismatch with {self._address}")
            self._expect = self._expect[seen:]
        return data


class _CheckedSecurityMultistream(SecurityMultistream):
    """Security negotiation over a pnet connection that fails fast on a wrong key."""

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return await super().secure_inbound(_checked(conn))

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return await super().secure_outbound(_checked(conn), peer_id)


def _checked(conn: IRawConnection) -> IRawConnection:
    # The swarm wraps the raw connection in a PskConn and hands it straight to the
    # security negotiation, before a byte is read or written: rebuilding it is safe.
    if isinstance(conn, PskConn) and not isinstance(conn, _CheckedPskConn):
        return _CheckedPskConn(conn._conn, conn._psk.hex())
    return conn


def check_psk(host: IHost) -> None:
    """Make ``host`` (not yet running) fail fast when a peer's pre-shared key differs.

    Raises:
        TypeError: the host's network has no transport upgrader to configure.
    """
    upgrader = getattr(host.get_network(), "upgrader", None)
    current = getattr(upgrader, "security_multistream", None)
    if not isinstance(current, SecurityMultistream):
        raise TypeError("this libp2p host has no security negotiation to configure")
    checked = _CheckedSecurityMultistream(dict(current.transports))
    upgrader.security_multistream = checked  # type: ignore[union-attr]
