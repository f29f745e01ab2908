"""The wallet's seed: deterministic secrets (NUT-13) so that its ecash can be restored (NUT-09).

Every secret and blinding factor the proxy's wallet makes is derived from one BIP39 mnemonic,
a keyset id and a counter. The counters live in the ledger (``ledger.counters``) and are
reserved durably before outputs go to the mint, so no two outputs ever share a secret, whatever
the number of processes on the database. With the mnemonic alone, ``Wallet.restore`` asks each
mint to sign again what it signed for those secrets, and so finds the wallet's proofs again.

The mnemonic is ``WALLET_MNEMONIC``, or else the one in ``DATA_DIR/wallet-mnemonic.txt``
(made on first start, shown once on stderr: back it up). The derivation is nutshell's
(``cashu.wallet.secrets``), so a nutshell wallet with the same mnemonic finds the same proofs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnemonic import Mnemonic

from routstr_addon.datadir import private_dir
from routstr_addon.settings import MnemonicError, normalize_mnemonic

if TYPE_CHECKING:
    from routstr_addon.settings import Config

__all__ = [
    "MNEMONIC_FILE",
    "MnemonicError",
    "Seed",
    "derive",
    "load_or_create_mnemonic",
    "normalize_mnemonic",
    "seed_from_mnemonic",
]

MNEMONIC_FILE = "wallet-mnemonic.txt"
_KDF_PREFIX = b"Cashu_KDF_HMAC_SHA256"
_HARDENED = 0x80000000
_BIP32_PURPOSE = "m/129372'/0'"  # NUT-13


def seed_from_mnemonic(mnemonic: str) -> bytes:
    """The 64-byte BIP39 seed (no passphrase, as nutshell's wallets make it)."""
    return Mnemonic.to_seed(normalize_mnemonic(mnemonic))


# --- the mnemonic file ----------------------------------------------------------------------


_FILE_HEADER = ("# The Routstr wallet's mnemonic (BIP39). Keep a copy somewhere safe: with it,\n"
                "# `routstr wallet restore` recovers the wallet's ecash if the database is lost.\n")


def _read_mnemonic_file(path: Path) -> str:
    lines = [line.strip() for line in path.read_text().splitlines()]
    text = " ".join(line for line in lines if line and not line.startswith("#"))
    try:
        return normalize_mnemonic(text)
    except MnemonicError as e:
        raise MnemonicError(f"{path}: {e}") from None


def _announce(mnemonic: str, path: Path) -> None:
    """The new mnemonic, once, on stderr (never through logging, which may be shipped off)."""
    words = mnemonic.split()
    rows = [" ".join(f"{i + 1:>2}. {w:<9}" for i, w in enumerate(words[k:k + 4], start=k))
            for k in range(0, len(words), 4)]
    text = [
        "NEW WALLET MNEMONIC: write these words down and keep them safe.",
        "They are the only way to recover the proxy's ecash if its database is lost",
        "(routstr wallet restore). Anyone who has them can take that ecash.",
        "",
        *rows,
        "",
        f"Kept in {path} (mode 0600); shown only this once.",
        "Or set WALLET_MNEMONIC to them and delete the file.",
    ]
    width = max(len(line) for line in text)
    box = ["╔" + "═" * (width + 2) + "╗",
           *(f"║ {line:<{width}} ║" for line in text),
           "╚" + "═" * (width + 2) + "╝"]
    sys.stderr.write("\n".join(box) + "\n")
    sys.stderr.flush()


def load_or_create_mnemonic(config: Config) -> str:
    """The wallet's mnemonic: ``WALLET_MNEMONIC``, else ``DATA_DIR/wallet-mnemonic.txt``, made
    (mode 0600) with a fresh 12-word mnemonic if missing. Raises MnemonicError for a file that
    does not hold a valid one."""
    if config.wallet_mnemonic:
        return normalize_mnemonic(config.wallet_mnemonic)
    path = config.data_dir / MNEMONIC_FILE
    if path.exists():
        return _read_mnemonic_file(path)
    private_dir(path.parent)
    mnemonic = Mnemonic("english").generate(128)
    # Written whole to a temporary file, then linked into place: two processes starting at
    # once agree on one mnemonic (the second link fails and that process reads the first's).
    tmp = path.with_name(f".{MNEMONIC_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_FILE_HEADER + mnemonic + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_mnemonic_file(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    _announce(mnemonic, path)
    return mnemonic


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- NUT-13 derivation ----------------------------------------------------------------------


def keyset_id_version(keyset_id: str) -> str:
    """``01`` (HMAC-SHA256 derivation), ``00``, or ``base64`` (both BIP32), as NUT-13 has it."""
    if len(keyset_id) in (16, 66) and keyset_id[:2] in ("00", "01"):
        try:
            bytes.fromhex(keyset_id)
        except ValueError:
            pass
        else:
            return keyset_id[:2]
    return "base64"


def _keyset_int(keyset_id: str) -> int:
    """The keyset id as a BIP32 child index (NUT-13: the id's integer modulo 2^31 - 1)."""
    try:
        raw = bytes.fromhex(keyset_id)
    except ValueError:  # a pre-0.15 base64 keyset id
        raw = base64.b64decode(keyset_id, altchars=b"-_", validate=True)
    return int.from_bytes(raw, "big") % (2**31 - 1)


def bip32_path(keyset_id: str, counter: int) -> str:
    """The BIP32 path of an output's secret (its blinding factor's ends in /1 instead)."""
    return f"{_BIP32_PURPOSE}/{_keyset_int(keyset_id)}'/{counter}'/0"


def _derive_hmac(seed: bytes, keyset_id: str, counter: int) -> tuple[str, bytes]:
    message = _KDF_PREFIX + bytes.fromhex(keyset_id) + counter.to_bytes(8, "big")
    secret = hmac.new(seed, message + b"\x00", hashlib.sha256).digest()
    r = hmac.new(seed, message + b"\x01", hashlib.sha256).digest()
    return secret.hex(), r


def derive(seed: bytes, keyset_id: str, counter: int) -> tuple[str, bytes]:
    """NUT-13: the secret (hex string, as it goes into a proof) and the blinding factor r
    (32 bytes) of output number ``counter`` of a keyset. HMAC-SHA256 for version-01 keyset
    ids, BIP32 (m/129372'/0'/keyset'/counter'/0 and /1) for older ones."""
    if counter < 0:
        raise ValueError("the counter must not be negative")
    if keyset_id_version(keyset_id) == "01":
        return _derive_hmac(seed, keyset_id, counter)
    return Seed(seed).derive(keyset_id, counter)


class Seed:
    """A seed, with the BIP32 nodes of legacy keysets kept (their hardened derivations cost
    the most)."""

    __slots__ = ("_master", "_nodes", "seed")

    def __init__(self, seed: bytes) -> None:
        if len(seed) < 16:
            raise ValueError("a seed has at least 16 bytes")
        self.seed = seed
        self._master: Any = None
        self._nodes: dict[str, Any] = {}

    def derive(self, keyset_id: str, counter: int) -> tuple[str, bytes]:
        if keyset_id_version(keyset_id) == "01":
            return _derive_hmac(self.seed, keyset_id, counter)
        if not 0 <= counter < _HARDENED:
            raise ValueError("BIP32 derivation (version-00 keysets) needs a counter below 2^31")
        node = self._nodes.get(keyset_id)
        if node is None:
            from bip32 import BIP32

            if self._master is None:
                self._master = BIP32.from_seed(self.seed)
            chaincode, privkey = self._master.get_extended_privkey_from_path(
                f"{_BIP32_PURPOSE}/{_keyset_int(keyset_id)}'")
            node = self._nodes[keyset_id] = BIP32(chaincode, privkey)
        secret = node.get_privkey_from_path([counter | _HARDENED, 0])
        r = node.get_privkey_from_path([counter | _HARDENED, 1])
        return bytes(secret).hex(), bytes(r)

