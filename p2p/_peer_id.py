"""Peer ids, without libp2p.

A libp2p peer id for an Ed25519 key is the *identity* multihash of the protobuf-encoded
public key (``00 24 | 08 01 12 20 | key``), shown in base58btc (``12D3KooW...``). Because
the key sits inside the id, anyone holding a peer id can check that peer's signatures
without fetching its key, which is how announcements, receipts and ledger blocks are
verified. Ids of other key types (RSA, secp256k1, hashed ids) are not accepted: this
network only issues Ed25519 identities.

This module is deliberately free of libp2p so that the sans-IO layers (messages,
announcements, ledger) can handle peer ids cheaply; the host adapter converts to
libp2p's ``ID`` at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2p._errors import P2PError

__all__ = ["PeerId", "InvalidPeerIdError", "signing_message"]

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
# identity multihash (0x00), length 36, protobuf: field 1 (KeyType) = 1 (Ed25519),
# field 2 (Data) = 32 bytes.
_ED25519_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_RAW_LEN = len(_ED25519_PREFIX) + 32
_MAX_TEXT_LEN = 64

# Every signature made with a node key covers this prefix, a one-byte domain length
# and the domain, so a signature made for one purpose (an announcement) can never be
# replayed as another (a receipt or a ledger block).
_SIG_PREFIX = b"shardnet-sig-v1\x00"


class InvalidPeerIdError(P2PError, ValueError):
    """Bytes or text that are not an Ed25519 libp2p peer id."""


def b58encode(data: bytes) -> str:
    """Encode bytes as base58btc (bitcoin alphabet), keeping leading zero bytes."""
    zeros = len(data) - len(data.lstrip(b"\x00"))
    num = int.from_bytes(data, "big")
    out: list[str] = []
    while num:
        num, rem = divmod(num, 58)
        out.append(_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Decode base58btc text; raises InvalidPeerIdError on a foreign character."""
    num = 0
    for ch in text:
        digit = _INDEX.get(ch)
        if digit is None:
            raise InvalidPeerIdError(f"not base58: {ch!r}")
        num = num * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = num.to_bytes((num.bit_length() + 7) // 8, "big") if num else b""
    return b"\x00" * zeros + body


def signing_message(domain: bytes, payload: bytes) -> bytes:
    """The exact bytes an Ed25519 signature covers for ``domain`` and ``payload``.

    Raises:
        ValueError: if the domain is empty or longer than 255 bytes.
    """
    if not 0 < len(domain) <= 255:
        raise ValueError("signature domain must be 1..255 bytes")
    return _SIG_PREFIX + bytes([len(domain)]) + domain + payload


@dataclass(frozen=True, slots=True)
class PeerId:
    """An Ed25519 peer id (38 raw bytes).

    Construct with :meth:`from_bytes`, :meth:`from_string` or :meth:`from_public_key`;
    they validate. Ordering is by raw bytes, so sorting peers is deterministic.
    """

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != _RAW_LEN or not self.raw.startswith(_ED25519_PREFIX):
            raise InvalidPeerIdError("not an Ed25519 identity peer id")

    @classmethod
    def from_bytes(cls, raw: bytes) -> PeerId:
        """Parse the binary form (as carried in messages)."""
        return cls(bytes(raw))

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse the base58 text form (``12D3KooW...``)."""
        if not 0 < len(text) <= _MAX_TEXT_LEN:
            raise InvalidPeerIdError("peer id text has a bad length")
        return cls(b58decode(text))

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        """Derive the id of a raw 32-byte Ed25519 public key."""
        if len(public_key) != 32:
            raise InvalidPeerIdError("an Ed25519 public key is 32 bytes")
        return cls(_ED25519_PREFIX + public_key)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key embedded in the id."""
        return self.raw[len(_ED25519_PREFIX) :]

    def to_bytes(self) -> bytes:
        """The binary form."""
        return self.raw

    def __str__(self) -> str:
        return b58encode(self.raw)

    def __repr__(self) -> str:
        return f"PeerId({self})"

    def __lt__(self, other: PeerId) -> bool:
        return self.raw < other.raw

    def short(self) -> str:
        """A short form for log lines (last 8 characters of the text form)."""
        return str(self)[-8:]

    def verify(self, domain: bytes, payload: bytes, signature: bytes) -> bool:
        """Check a domain-separated signature made by this peer's key.

        Returns False (never raises) for a bad signature, a malformed signature, or
        a public key that is not a valid curve point, since all of these are simply
        "not signed by this peer".
        """
        if len(signature) != 64:
            return False
        try:
            key = Ed25519PublicKey.from_public_bytes(self.public_key)
            key.verify(signature, signing_message(domain, payload))
        except (InvalidSignature, ValueError):
            return False
        return True
