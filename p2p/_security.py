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
"""

from __future__ import annotations

import logging
from collections.abc import Set

import trio
from libp2p.abc import IRawConnection, ISecureConn
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol, TSecurityOptions
from libp2p.io.exceptions import IOException
from libp2p.peer.id import ID
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession

from p2p._identity import Identity
from p2p._peer_id import PeerId
from p2p._secure_session import WRITE_STALL_TIMEOUT, NoiseSession
from p2p._shaper import LinkShaper

__all__ = ["libp2p_key_pair", "security_options", "SafeNoise", "WRITE_STALL_TIMEOUT"]

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
