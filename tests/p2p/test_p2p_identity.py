"""Identity: persistence, atomic creation, permissions, signatures, peer id format."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519PrivateKey
from libp2p.crypto.ed25519 import Ed25519PublicKey as Libp2pEd25519PublicKey
from libp2p.peer.id import ID

from p2p import Identity, IdentityError, InvalidPeerIdError, PeerId
from p2p._identity import KEY_FILE_NAME


def test_identity_persists_across_restart(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path / "node")
    second = Identity.load_or_create(tmp_path / "node")
    assert first.peer_id == second.peer_id
    assert first.peer_id_str == str(second.peer_id)
    key_file = tmp_path / "node" / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # no temporary files left behind
    assert [p.name for p in (tmp_path / "node").iterdir()] == [KEY_FILE_NAME]
    other = Identity.load_or_create(tmp_path / "other")
    assert other.peer_id != first.peer_id


def test_identity_refuses_world_readable_key(tmp_path: Path) -> None:
    Identity.load_or_create(tmp_path)
    os.chmod(tmp_path / KEY_FILE_NAME, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load_or_create(tmp_path)


def test_identity_rejects_garbage_key_file(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(IdentityError):
        Identity.load_or_create(tmp_path)


def test_existing_key_is_never_replaced(tmp_path: Path) -> None:
    from p2p._identity import _create_key_file

    original = Identity.load_or_create(tmp_path)
    _create_key_file(tmp_path / KEY_FILE_NAME)  # a racing creator loses
    assert Identity.load_or_create(tmp_path).peer_id == original.peer_id


def test_signatures_are_domain_separated() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"shardnet/test/1", b"payload")
    assert ident.verify(b"shardnet/test/1", b"payload", sig)
    assert ident.peer_id.verify(b"shardnet/test/1", b"payload", sig)
    assert not ident.verify(b"shardnet/other/1", b"payload", sig)
    assert not ident.verify(b"shardnet/test/1", b"payload!", sig)
    assert not Identity.generate().verify(b"shardnet/test/1", b"payload", sig)
    assert not ident.verify(b"shardnet/test/1", b"payload", sig[:-1])
    with pytest.raises(ValueError):
        ident.sign(b"", b"x")


def test_peer_id_matches_libp2p() -> None:
    ident = Identity.from_seed(bytes(range(32)))
    libp2p_key = Libp2pEd25519PrivateKey.new(ident.seed())
    libp2p_id = ID.from_pubkey(libp2p_key.get_public_key())
    assert ident.peer_id_bytes == libp2p_id.to_bytes()
    assert ident.peer_id_str == libp2p_id.to_base58()
    assert PeerId.from_string(libp2p_id.to_base58()) == ident.peer_id
    pub = Libp2pEd25519PublicKey.from_bytes(ident.public_key)
    assert pub.verify(b"data", libp2p_key.sign(b"data"))


@pytest.mark.parametrize("text", ["", "0OIl", "Qm" + "1" * 44, "x" * 100])
def test_bad_peer_id_text(text: str) -> None:
    with pytest.raises(InvalidPeerIdError):
        PeerId.from_string(text)


def test_bad_peer_id_bytes() -> None:
    with pytest.raises(InvalidPeerIdError):
        PeerId.from_bytes(b"\x00" * 38)
