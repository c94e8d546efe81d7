"""The node's identity: one Ed25519 key, persisted, reused for everything.

Theory of operation
-------------------
The key lives in ``<data_dir>/identity.key`` as an unencrypted PKCS#8 PEM file with
mode 0600 (the same protection an ssh host key gets). The same key is the libp2p host
key (so the peer id never changes across restarts), signs announcements, receipts and
ledger blocks. Every signature is domain-separated (see :func:`signing_message`).

Creation is atomic and race-free: the key is written to a temporary file opened with
``O_CREAT | O_EXCL`` and mode 0600, fsynced, then hard-linked into place (a link, unlike
a rename, never replaces an existing file, so two processes racing to create the key
both end up with the winner's key), and the directory is fsynced. On filesystems
without hard links we fall back to a rename.

Loading refuses a key file that group or others can read: a leaked node key lets
anyone forge this node's receipts and ledger blocks.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2p._errors import IdentityError
from p2p._peer_id import PeerId, signing_message

__all__ = ["Identity", "KEY_FILE_NAME"]

logger = logging.getLogger(__name__)

KEY_FILE_NAME = "identity.key"
_MAX_KEY_FILE_BYTES = 4096


class Identity:
    """An Ed25519 key pair with the derived peer id.

    Use :meth:`load_or_create` for a node's persistent identity and :meth:`generate`
    for throwaway ones (tests, benchmarks).
    """

    __slots__ = ("_key", "_peer_id", "_seed")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._peer_id = PeerId.from_public_key(public)
        self._seed = private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity that is never written to disk."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """An identity from a 32-byte Ed25519 seed (deterministic tests)."""
        if len(seed) != 32:
            raise IdentityError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> Identity:
        """Load the node key from ``data_dir``, creating it (atomically) if absent.

        Raises:
            IdentityError: the file is unreadable, malformed, not Ed25519, or readable
                by group/others.
        """
        directory = Path(data_dir)
        path = directory / KEY_FILE_NAME
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                _create_key_file(path)
            return cls._load(path)
        except OSError as exc:
            raise IdentityError(f"cannot use identity file {path}: {exc}") from exc

    @classmethod
    def _load(cls, path: Path) -> Identity:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise IdentityError(f"{path} is not a regular file")
            if info.st_mode & 0o077:
                raise IdentityError(
                    f"{path} is accessible by group/others (mode "
                    f"{stat.S_IMODE(info.st_mode):o}); run: chmod 600 {path}"
                )
            if info.st_size > _MAX_KEY_FILE_BYTES:
                raise IdentityError(f"{path} is too large to be a key file")
            data = os.read(fd, _MAX_KEY_FILE_BYTES)
        finally:
            os.close(fd)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"{path} is not a PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a non-Ed25519 key")
        return cls(key)

    @property
    def peer_id(self) -> PeerId:
        """This node's peer id."""
        return self._peer_id

    @property
    def peer_id_str(self) -> str:
        """The peer id in its text form (``12D3KooW...``)."""
        return str(self._peer_id)

    @property
    def peer_id_bytes(self) -> bytes:
        """The peer id in its binary form (as carried in messages)."""
        return self._peer_id.raw

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._peer_id.public_key

    def seed(self) -> bytes:
        """The raw 32-byte private seed (for the libp2p host adapter only)."""
        return self._seed

    def sign(self, domain: bytes, payload: bytes) -> bytes:
        """Sign ``payload`` for the purpose named by ``domain`` (64-byte signature).

        Args:
            domain: a short fixed tag such as ``b"shardnet/announce/1"``; a signature
                made under one domain never verifies under another.
            payload: the exact bytes to sign (an encoded record).
        """
        return self._key.sign(signing_message(domain, payload))

    def verify(self, domain: bytes, payload: bytes, signature: bytes) -> bool:
        """Check a signature made by this identity (see :meth:`PeerId.verify`)."""
        return self._peer_id.verify(domain, payload, signature)

    def __repr__(self) -> str:
        return f"Identity({self._peer_id})"


def _create_key_file(path: Path) -> None:
    """Write a fresh key to ``path`` without ever exposing a partial or shared file."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            logger.info("identity %s was created concurrently; using that one", path)
        except OSError:
            # No hard links here (some FUSE/network filesystems): rename instead.
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    logger.info("created new node identity at %s", path)
