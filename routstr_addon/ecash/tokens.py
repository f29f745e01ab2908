"""Cashu tokens: parsing, serializing, amounts and fees, on nutshell's models and crypto.

nutshell (the ``cashu`` package) is imported through ``nutshell()``: importing its settings
reads ``./.env`` into ``os.environ`` with override and cuts tracebacks to one line, which would
change this whole process; the import here puts both back as they were.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from routstr_addon.ledger.schema import UNIT_MSAT  # the units the proxy takes, in msat

if TYPE_CHECKING:
    from cashu.core.base import Proof
    from cashu.core.crypto.secp import PublicKey

__all__ = [
    "UNIT_MSAT",
    "IncomingToken",
    "Keyset",
    "TokenError",
    "amounts_for",
    "change_friendly_amounts",
    "fee_for",
    "normalize_token",
    "nutshell",
    "parse_token",
    "pick_exact",
    "serialize_token",
    "token_hash",
]


def nutshell() -> None:
    """Import the parts of nutshell we use, leaving the environment and tracebacks alone."""
    if "cashu.core.base" in sys.modules:
        return
    saved_env = dict(os.environ)
    saved_limit = getattr(sys, "tracebacklimit", None)
    try:
        import cashu.core.base
        import cashu.core.crypto.b_dhke
        import cashu.core.nuts.nut18  # noqa: F401
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        if saved_limit is None:
            if hasattr(sys, "tracebacklimit"):
                del sys.tracebacklimit
        else:
            sys.tracebacklimit = saved_limit


class TokenError(ValueError):
    """A token that cannot be read; ``code`` is the API error code to answer with."""

    def __init__(self, message: str, code: str = "invalid_token") -> None:
        super().__init__(message)
        self.code = code


def normalize_token(text: str) -> str:
    """The token itself: whitespace and a ``cashu:`` URI prefix removed."""
    token = text.strip()
    if token[:6].lower() == "cashu:":
        token = token[6:].strip()
    return token


def token_hash(text: str) -> str:
    """Hex SHA-256 of the normalized token: how the ledger names a token it has seen."""
    return hashlib.sha256(normalize_token(text).encode()).hexdigest()


def sanitize_mint_url(url: str) -> str:
    """Mint URLs compared as nutshell does: lower-case host, no trailing slash."""
    url = url.strip()
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    path = path.rstrip("/")
    return f"{scheme.lower()}://{host.lower()}{'/' + path if path else ''}"


@dataclass(frozen=True, slots=True)
class IncomingToken:
    """A parsed token: which mint and unit, and its proofs (keyset ids as the token has them)."""

    text: str  # normalized
    mint: str
    unit: str
    proofs: list[Proof] = field(repr=False)
    memo: str | None = None

    @property
    def amount(self) -> int:
        return sum(p.amount for p in self.proofs)

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def msat(self) -> int:
        return self.amount * UNIT_MSAT[self.unit]


def looks_like_token(text: str | None) -> bool:
    return bool(text) and normalize_token(text or "")[:6] in ("cashuA", "cashuB")


def parse_token(text: str) -> IncomingToken:
    """Read a cashuA (V3) or cashuB (V4) token, with or without the ``cashu:`` prefix."""
    nutshell()
    from cashu.core.base import TokenV3, TokenV4

    token_text = normalize_token(text)
    if len(token_text) > 200_000:
        raise TokenError("The token is too large.")
    try:
        if token_text.startswith("cashuB"):
            token: TokenV3 | TokenV4 = TokenV4.deserialize(token_text)
        elif token_text.startswith("cashuA"):
            token = TokenV3.deserialize(token_text)
            if len({t.mint for t in token.token}) != 1:
                raise TokenError("A token must hold proofs of one mint only.")
        else:
            raise TokenError("Not a Cashu token: expected cashuA… or cashuB….")
        proofs = token.proofs
        mint, unit, memo = token.mint, token.unit or "sat", token.memo
    except TokenError:
        raise
    except Exception:  # a truncated or corrupted token fails in many ways inside nutshell
        raise TokenError("The Cashu token is malformed or truncated.") from None
    if not proofs or not mint:
        raise TokenError("The Cashu token holds no proofs.")
    if any(not isinstance(p.amount, int) or p.amount <= 0 or p.amount > 2**42 for p in proofs):
        raise TokenError("The Cashu token holds an invalid amount.")
    if len({p.secret for p in proofs}) != len(proofs):
        raise TokenError("The Cashu token holds the same proof twice.")
    return IncomingToken(token_text, sanitize_mint_url(mint), unit, proofs, memo)


def serialize_token(mint: str, unit: str, proofs: Sequence[Proof], memo: str | None = None) -> str:
    """A cashuB token for proofs of one keyset set, DLEQ proofs included when known."""
    nutshell()
    from cashu.core.base import TokenV4, TokenV4Proof, TokenV4Token

    by_keyset: dict[str, list[Proof]] = {}
    for p in proofs:
        by_keyset.setdefault(p.id, []).append(p)
    token = TokenV4(
        m=mint, u=unit, d=memo,
        t=[TokenV4Token(i=bytes.fromhex(keyset_id),
                        p=[TokenV4Proof.from_proof(p, include_dleq=p.dleq is not None)
                           for p in ps])
           for keyset_id, ps in by_keyset.items()],
    )
    serialized: str = token.serialize(include_dleq=all(p.dleq is not None for p in proofs))
    return serialized


# --- keysets and fees -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keyset:
    id: str
    unit: str
    active: bool
    input_fee_ppk: int
    keys: dict[int, PublicKey] = field(repr=False)

    @property
    def short_id(self) -> str:
        """How V4 tokens write a version-01 keyset id: its first 8 bytes."""
        return self.id[:16] if self.id.startswith("01") else self.id


def fee_for(keyset_fees: Iterable[int]) -> int:
    """NUT-02: the input fee of a swap, ceil(sum of the inputs' ppk / 1000), in the unit."""
    return -(-sum(keyset_fees) // 1000)


# --- amounts --------------------------------------------------------------------------------


def amounts_for(amount: int) -> list[int]:
    """``amount`` as powers of two, largest first (the denominations of a keyset)."""
    if amount < 0:
        raise ValueError("negative amount")
    return [1 << i for i in range(amount.bit_length() - 1, -1, -1) if amount >> i & 1]


def change_friendly_amounts(total: int, variable: int) -> list[int]:
    """Outputs for ``total`` from which every change in ``[total - variable, total]`` is a
    subset, so change can be cut without asking the mint again.

    ``total - variable`` is always change: its plain decomposition. The ``variable`` part is
    1, 2, 4, …, 2^(k-1) with 2^k - 1 ≤ variable, plus the rest (< 2^k) in powers of two: any
    value from 0 to ``variable`` is a subset of that.
    """
    variable = max(0, min(variable, total))
    k = (variable + 1).bit_length() - 1
    ladder = [1 << i for i in range(k)]
    rest = variable - ((1 << k) - 1)
    return sorted(amounts_for(total - variable) + ladder + amounts_for(rest), reverse=True)


def pick_exact(amounts: Sequence[int], target: int) -> list[int] | None:
    """Indexes of ``amounts`` (powers of two) summing exactly to ``target``, or None.

    Greedy from the largest is exact for power-of-two denominations: each divides the next.
    """
    chosen: list[int] = []
    left = target
    for i in sorted(range(len(amounts)), key=lambda j: -amounts[j]):
        if amounts[i] <= left:
            chosen.append(i)
            left -= amounts[i]
            if left == 0:
                break
    return chosen if left == 0 else None


def proof_to_dict(proof: Proof) -> dict[str, Any]:
    """What a mint wants of a proof as a swap input."""
    data: dict[str, Any] = {"id": proof.id, "amount": proof.amount, "secret": proof.secret,
                            "C": proof.C}
    if proof.witness:
        data["witness"] = proof.witness
    return data
