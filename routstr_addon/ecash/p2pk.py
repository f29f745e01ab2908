"""Ecash locked to the proxy's key (NUT-10/11), checked offline (NUT-12): no mint on the path.

A NUT-18 payment request can ask for proofs locked (P2PK) to the proxy's *payment key*. Locked
that way, with no other spending path, only the proxy can spend them; their DLEQ proofs show,
offline, that the mint signed them; their ``Y = hash_to_curve(secret)`` values, recorded once in
the ledger, stop replays. What is left is the mint's own risk (as for any ecash the proxy holds)
and a locktime the proxy must beat by swapping the proofs in time.

Everything here is pure: no I/O, no ledger. ``verify_payment`` runs every offline check of a
token, cheapest first, and refuses with a typed ``LockRefused`` the request path maps to a 400;
the ledger's "seen before" lookup plugs in through its ``already_seen`` argument. Spending the
proofs later takes a NUT-11 witness per proof, from ``PaymentKey.witness``.

The curve arithmetic is coincurve's (libsecp256k1) called directly, with the mint's keys decoded
once per keyset: nutshell's helpers build a ``PrivateKey`` per scalar, and each of those computes
two public keys nobody uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from coincurve import PrivateKey, PublicKey

from routstr_addon.ecash.tokens import TokenError, fee_for, sanitize_mint_url

if TYPE_CHECKING:
    from cashu.core.base import Proof

    from routstr_addon.ecash.tokens import IncomingToken, Keyset

__all__ = [
    "DEFAULT_LOCKTIME_MARGIN",
    "MAX_PROOFS",
    "MAX_SECRET_LENGTH",
    "PAYMENT_KEY_PATH",
    "Lock",
    "LockPolicy",
    "LockRefused",
    "MintKeys",
    "MintKeyset",
    "PaymentKey",
    "Refusal",
    "VerifiedPayment",
    "check_lock",
    "hash_to_curve",
    "looks_locked",
    "parse_lock",
    "sign_witnesses",
    "supports_locked_payments",
    "verify_dleq",
    "verify_payment",
    "y_hex",
]

# BIP32 path of the payment key: purpose "RSTR" (0x52535452), hardened all the way. It lies
# outside NUT-13's m/129372'/… tree, so it can never be the secret or blinding factor of a
# proof, and outside nutshell's own P2PK key (m/129372'/0'/0'/0'): a nutshell wallet restored
# from the same mnemonic does not hold it by accident.
PAYMENT_KEY_PURPOSE = int.from_bytes(b"RSTR", "big")
PAYMENT_KEY_PATH = f"m/{PAYMENT_KEY_PURPOSE}'/0'/{{index}}'"

MAX_SECRET_LENGTH = 512  # a P2PK secret with a locktime is ~200 characters; mints allow 1024
MAX_PROOFS = 64  # bounds the CPU one token can cost (a DLEQ check is ~0.25 ms)
DEFAULT_LOCKTIME_MARGIN = 3600  # seconds a locktime must lie ahead of now

_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141  # secp256k1 order
_H2C_DOMAIN = b"Secp256k1_HashToCurve_Cashu_"
_SHA256 = hashlib.sha256


# --- refusals -------------------------------------------------------------------------------


class Refusal(StrEnum):
    """Why a locked payment is refused; the value is the API error code."""

    UNTRUSTED_MINT = "untrusted_mint"
    TOO_MANY_PROOFS = "too_many_proofs"
    UNKNOWN_KEYSET = "unknown_keyset"
    AMBIGUOUS_KEYSET = "ambiguous_keyset"
    KEYSET_EXPIRING = "keyset_expiring"
    WRONG_UNIT = "wrong_unit"
    UNKNOWN_AMOUNT = "unknown_amount"
    SECRET_TOO_LONG = "secret_too_long"  # noqa: S105 - an error code
    MALFORMED_PROOF = "malformed_proof"
    BLINDED_KEY = "blinded_key"
    MISSING_DLEQ = "missing_dleq"
    NOT_LOCKED = "not_locked"
    MALFORMED_SECRET = "malformed_secret"  # noqa: S105 - an error code
    NOT_P2PK = "not_p2pk"
    WRONG_KEY = "wrong_key"
    EXTRA_PUBKEYS = "extra_pubkeys"
    REFUND_PATH = "refund_path"
    MULTISIG = "multisig"
    SIG_ALL = "sig_all"
    UNSUPPORTED_TAG = "unsupported_tag"
    LOCKTIME_TOO_SOON = "locktime_too_soon"
    DUPLICATE_PROOF = "duplicate_proof"
    ALREADY_SPENT = "token_already_spent"
    INVALID_DLEQ = "invalid_dleq"


class LockRefused(TokenError):
    """A token refused by an offline check: ``reason`` says which, ``index`` which proof.

    A TokenError, so the request path answers it like any bad token: 400 with ``code`` (NUT-24:
    wrong mint, unit, amount or lock is a 400). Nothing has been stored when it is raised.
    """

    status = 400

    def __init__(self, reason: Refusal, message: str, index: int | None = None) -> None:
        super().__init__(message, code=reason.value)
        self.reason = reason
        self.index = index


def _refuse(reason: Refusal, message: str, index: int | None = None) -> LockRefused:
    where = f" (proof {index + 1})" if index is not None else ""
    return LockRefused(reason, message + where, index)


# --- the payment key ------------------------------------------------------------------------


class PaymentKey:
    """The proxy's payment key: secp256k1, derived from the wallet's BIP39 seed at
    ``PAYMENT_KEY_PATH`` so that restoring the mnemonic restores it (and the locked proofs it
    can still redeem). ``public_hex`` is what the 402's NUT-18 request locks to."""

    __slots__ = ("_private", "index", "public_hex")

    def __init__(self, secret: bytes, index: int = 0) -> None:
        self._private = PrivateKey(secret)
        self.index = index
        self.public_hex: str = self._private.public_key.format(compressed=True).hex()

    @classmethod
    def from_seed(cls, seed: bytes, index: int = 0) -> PaymentKey:
        """The key at ``m/1381192786'/0'/<index>'`` of a BIP39 seed (64 bytes)."""
        from bip32 import BIP32

        if not 0 <= index < 2**31:
            raise ValueError("the key index is a hardened BIP32 index below 2^31")
        secret = BIP32.from_seed(seed).get_privkey_from_path(PAYMENT_KEY_PATH.format(index=index))
        return cls(bytes(secret), index)

    @classmethod
    def from_mnemonic(cls, mnemonic: str, index: int = 0) -> PaymentKey:
        from routstr_addon.ecash.seed import seed_from_mnemonic

        return cls.from_seed(seed_from_mnemonic(mnemonic), index)

    def __repr__(self) -> str:  # never the private key
        return f"PaymentKey(public_hex={self.public_hex!r}, index={self.index})"

    def _sign(self, message: str) -> str:
        """NUT-11: a BIP-340 Schnorr signature (hex) over SHA-256 of the message's UTF-8."""
        digest = _SHA256(message.encode()).digest()
        return self._private.sign_schnorr(digest).hex()

    def witness(self, secret: str) -> str:
        """The ``witness`` that spends a proof locked to this key (NUT-11, SIG_INPUTS).

        Refuses (LockRefused) a secret not locked to this key: the key signs only what it
        should, never a message someone chose."""
        lock = parse_lock(secret)
        if lock.data != self.public_hex:
            raise _refuse(Refusal.WRONG_KEY, "The proof is not locked to this key.")
        if lock.sigflag != "SIG_INPUTS":
            raise _refuse(Refusal.SIG_ALL, "SIG_ALL proofs are signed over the whole swap.")
        return json.dumps({"signatures": [self._sign(secret)]}, separators=(",", ":"))


def sign_witnesses(proofs: Iterable[Proof], key: PaymentKey) -> list[Proof]:
    """Copies of ``proofs`` carrying the witness that lets ``key`` spend each at the mint."""
    return [p.model_copy(update={"witness": key.witness(p.secret)}) for p in proofs]


# --- NUT-10 secrets -------------------------------------------------------------------------

_SINGLE_TAGS = frozenset({"sigflag", "n_sigs", "locktime", "n_sigs_refund"})
_MULTI_TAGS = frozenset({"pubkeys", "refund"})
_ACCEPTED_TAGS = frozenset({"sigflag", "n_sigs", "locktime"})
_SIGFLAGS = frozenset({"SIG_INPUTS", "SIG_ALL"})
_PAYLOAD_FIELDS = frozenset({"nonce", "data", "tags"})


@dataclass(frozen=True, slots=True)
class Lock:
    """A NUT-10 well-known secret of kind P2PK, read strictly."""

    data: str
    nonce: str
    tags: tuple[tuple[str, ...], ...]
    locktime: int | None
    sigflag: str
    n_sigs: int | None

    @property
    def tag_names(self) -> set[str]:
        return {tag[0] for tag in self.tags}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _int_tag(value: str) -> int | None:
    """An integer tag value as nutshell reads it (ASCII decimal digits only)."""
    return int(value) if value.isascii() and value.isdecimal() and len(value) <= 20 else None


def looks_locked(secret: str) -> bool:
    """Whether a secret is shaped like a NUT-10 secret (a JSON array): the request path sends
    tokens of plain secrets down the swap path instead of this one."""
    return secret.lstrip()[:1] == "["


def parse_lock(secret: str) -> Lock:
    """Read a proof's secret as a NUT-10 P2PK secret, as strictly as a nutshell mint would.

    NOT_LOCKED for a plain secret, NOT_P2PK for another kind (HTLC), MALFORMED_SECRET for
    anything a mint would refuse to spend: duplicate keys or tags, unknown payload fields,
    empty or non-string tag values, a locktime or n_sigs that is not a positive integer.
    Accepting less than a mint does is safe; accepting more would take unspendable ecash.
    """
    try:
        decoded = json.loads(secret, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError):  # JSONDecodeError, a duplicate key, deep nesting
        if looks_locked(secret):
            raise _refuse(Refusal.MALFORMED_SECRET, "The proof's secret is not valid NUT-10 "
                          "JSON.") from None
        raise _refuse(Refusal.NOT_LOCKED, "The proof is not locked (a plain secret).") from None
    if not isinstance(decoded, list):
        raise _refuse(Refusal.NOT_LOCKED, "The proof is not locked (a plain secret).")
    if len(decoded) != 2 or not isinstance(decoded[0], str) or not isinstance(decoded[1], dict):
        raise _refuse(Refusal.MALFORMED_SECRET, "The proof's secret is not a NUT-10 "
                      "[kind, {nonce, data, tags}] pair.")
    kind, payload = decoded
    if kind != "P2PK":
        raise _refuse(Refusal.NOT_P2PK, f"The proof is locked with {kind[:16]!r}, not P2PK.")
    if not payload.keys() <= _PAYLOAD_FIELDS:
        raise _refuse(Refusal.MALFORMED_SECRET, "The proof's secret has unexpected fields.")
    nonce, data, tags = payload.get("nonce"), payload.get("data"), payload.get("tags", [])
    if not isinstance(nonce, str) or not nonce or not isinstance(data, str) or not data:
        raise _refuse(Refusal.MALFORMED_SECRET, "The proof's secret needs a nonce and data.")
    if not isinstance(tags, list):
        raise _refuse(Refusal.MALFORMED_SECRET, "The proof's secret has invalid tags.")
    seen: set[str] = set()
    for tag in tags:
        if not isinstance(tag, list) or not tag or not all(isinstance(v, str) and v for v in tag):
            raise _refuse(Refusal.MALFORMED_SECRET, "A tag of the proof's secret is not a list "
                          "of non-empty strings.")
        name = tag[0]
        if name in _SINGLE_TAGS or name in _MULTI_TAGS:
            if name in seen:
                raise _refuse(Refusal.MALFORMED_SECRET, f"The proof's secret repeats the "
                              f"{name} tag.")
            seen.add(name)
            if len(tag) < 2 or (name in _SINGLE_TAGS and len(tag) != 2):
                raise _refuse(Refusal.MALFORMED_SECRET, f"The proof's {name} tag is invalid.")
    frozen = tuple(tuple(tag) for tag in tags)
    values = {tag[0]: tag[1] for tag in frozen if tag[0] in _SINGLE_TAGS}
    locktime = n_sigs = None
    if "locktime" in values and (locktime := _int_tag(values["locktime"])) is None:
        raise _refuse(Refusal.MALFORMED_SECRET, "The proof's locktime is not an integer.")
    if "n_sigs" in values and not (n_sigs := _int_tag(values["n_sigs"])):
        raise _refuse(Refusal.MALFORMED_SECRET, "The proof's n_sigs is not a positive integer.")
    sigflag = values.get("sigflag", "SIG_INPUTS")
    if sigflag not in _SIGFLAGS:
        raise _refuse(Refusal.MALFORMED_SECRET, "The proof's sigflag is invalid.")
    return Lock(data, nonce, frozen, locktime, sigflag, n_sigs)


def check_lock(lock: Lock, pubkey: str, not_before: float) -> None:
    """Refuse a lock the proxy alone could not spend until ``not_before`` (unix seconds).

    Exactly one spending path, the proxy's key: no extra ``pubkeys`` (another signer), no
    ``refund`` (someone else after the locktime), n_sigs absent or 1, SIG_INPUTS (SIG_ALL binds
    the signature to one swap's outputs), no tag the proxy does not know, and a locktime (after
    which anyone may spend a proof without refund keys) far enough ahead to swap in time.
    """
    if lock.data != pubkey:
        raise _refuse(Refusal.WRONG_KEY, "The proof is locked to another key than this "
                      "proxy's payment key.")
    names = lock.tag_names
    if "pubkeys" in names:
        raise _refuse(Refusal.EXTRA_PUBKEYS, "The proof's lock names other keys (pubkeys).")
    if "refund" in names or "n_sigs_refund" in names:
        raise _refuse(Refusal.REFUND_PATH, "The proof's lock has a refund path.")
    if lock.n_sigs not in (None, 1):
        raise _refuse(Refusal.MULTISIG, "The proof's lock needs several signatures (n_sigs).")
    if lock.sigflag == "SIG_ALL":
        raise _refuse(Refusal.SIG_ALL, "The proof's lock is SIG_ALL; only SIG_INPUTS is "
                      "accepted.")
    unknown = names - _ACCEPTED_TAGS
    if unknown:
        raise _refuse(Refusal.UNSUPPORTED_TAG, f"The proof's lock has a tag this proxy does not "
                      f"accept: {sorted(unknown)[0][:32]!r}.")
    if lock.locktime is not None and lock.locktime < not_before:
        raise _refuse(Refusal.LOCKTIME_TOO_SOON, "The proof's locktime is too soon: lock "
                      "without a locktime, or with one further ahead.")


# --- hash_to_curve and DLEQ (NUT-00, NUT-12) ------------------------------------------------


def hash_to_curve(message: bytes) -> PublicKey:
    """NUT-00's hash_to_curve (the point Y a mint signs for a secret)."""
    digest = _SHA256(_H2C_DOMAIN + message).digest()
    for counter in range(2**16):
        try:
            return PublicKey(b"\x02" + _SHA256(digest + counter.to_bytes(4, "little")).digest())
        except ValueError:  # not on the curve: about one try in two
            continue
    raise ValueError("no point found")  # pragma: no cover - probability 2^-65536


def y_hex(secret: str) -> str:
    """``Y = hash_to_curve(secret)``, compressed hex: the key the mint and the ledger use for a
    proof (NUT-07), and so the replay key."""
    return hash_to_curve(secret.encode()).format().hex()


def _scalar(text: Any) -> int:
    """A 32-byte hex scalar in [1, n), or 0 for anything else (an invalid DLEQ)."""
    if not isinstance(text, str) or len(text) != 64:
        return 0
    try:
        value = int(text, 16)
    except ValueError:
        return 0
    return value if 0 < value < _N else 0


@dataclass(frozen=True, slots=True)
class _MintKey:
    point: PublicKey
    uncompressed_hex: str  # as NUT-12's hash takes it


def _dleq_ok(y: PublicKey, c_hex: str, e_hex: str, s_hex: str, r_hex: str, a: _MintKey) -> bool:
    """NUT-12, Carol's side: C' = C + r·A, B' = Y + r·G, R1 = s·G − e·A, R2 = s·B' − e·C',
    valid iff e = SHA-256(R1 ‖ R2 ‖ A ‖ C') over the uncompressed hex of each point."""
    e, s, r = _scalar(e_hex), _scalar(s_hex), _scalar(r_hex)
    if not (e and s and r) or len(c_hex) != 66:
        return False
    try:
        c = PublicKey(bytes.fromhex(c_hex))
        r_bytes, s_bytes = r.to_bytes(32, "big"), s.to_bytes(32, "big")
        minus_e = (_N - e).to_bytes(32, "big")
        c_ = PublicKey.combine_keys([c, a.point.multiply(r_bytes)])
        b_ = PublicKey.combine_keys([y, PublicKey.from_valid_secret(r_bytes)])
        r1 = PublicKey.combine_keys([PublicKey.from_valid_secret(s_bytes),
                                     a.point.multiply(minus_e)])
        r2 = PublicKey.combine_keys([b_.multiply(s_bytes), c_.multiply(minus_e)])
    except ValueError:  # C not a point, or a sum at infinity: not a valid proof
        return False
    challenge = (r1.format(compressed=False).hex() + r2.format(compressed=False).hex()
                 + a.uncompressed_hex + c_.format(compressed=False).hex())
    return int.from_bytes(_SHA256(challenge.encode()).digest(), "big") == e


def verify_dleq(proof: Proof, keyset: MintKeyset) -> bool:
    """Whether the proof carries a DLEQ proof (e, s, r) that the mint's key for its amount in
    ``keyset`` signed it (NUT-12). False without one: here a missing DLEQ is a failed one."""
    key = keyset.points.get(proof.amount)
    dleq = proof.dleq
    if key is None or dleq is None:
        return False
    return _dleq_ok(hash_to_curve(proof.secret.encode()), proof.C, dleq.e, dleq.s, dleq.r, key)


# --- the mint's keysets ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MintKeyset:
    """One keyset of a mint as the offline checks need it, its keys decoded once."""

    id: str
    unit: str
    keys: Mapping[int, str] = field(repr=False)  # amount -> compressed public key hex
    input_fee_ppk: int = 0
    active: bool = True
    final_expiry: int | None = None  # unix seconds after which the mint refuses its proofs
    points: dict[int, _MintKey] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        points = {}
        for amount, key in self.keys.items():
            point = PublicKey(bytes.fromhex(key))
            points[int(amount)] = _MintKey(point, point.format(compressed=False).hex())
        object.__setattr__(self, "points", points)

    @classmethod
    def from_keyset(cls, keyset: Keyset, final_expiry: int | None = None) -> MintKeyset:
        """From the wallet's ``Keyset`` (whose keys are nutshell public keys)."""
        return cls(keyset.id, keyset.unit, {a: k.format().hex() for a, k in keyset.keys.items()},
                   keyset.input_fee_ppk, keyset.active, final_expiry)

    @classmethod
    def from_api(cls, info: Mapping[str, Any], keys: Mapping[str, str]) -> MintKeyset:
        """From a mint's ``/v1/keysets`` entry and its ``/v1/keys/{id}`` ``keys`` map."""
        expiry = info.get("final_expiry")
        return cls(str(info["id"]), str(info["unit"]), {int(a): k for a, k in keys.items()},
                   int(info.get("input_fee_ppk") or 0), bool(info.get("active", True)),
                   int(expiry) if expiry is not None else None)

    @property
    def short_id(self) -> str:
        """NUT-02: a version-01 id shortened to its first 8 bytes, as V4 tokens may carry it."""
        return self.id[:16] if self.id.startswith("01") else self.id


class MintKeys:
    """A trusted mint's keysets, by id and by the short ids V4 tokens carry."""

    def __init__(self, mint_url: str, keysets: Iterable[MintKeyset]) -> None:
        self.mint = sanitize_mint_url(mint_url)
        self.keysets = {k.id: k for k in keysets}
        self._short: dict[str, list[MintKeyset]] = {}
        for keyset in self.keysets.values():
            if keyset.short_id != keyset.id:
                self._short.setdefault(keyset.short_id, []).append(keyset)

    def resolve(self, keyset_id: str, index: int | None = None) -> MintKeyset:
        """The keyset a proof names; UNKNOWN_KEYSET, or AMBIGUOUS_KEYSET for a short id two
        keysets share (NUT-02 says to refuse it rather than guess)."""
        found = self.keysets.get(keyset_id)
        if found is not None:
            return found
        matches = self._short.get(keyset_id, ())
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise _refuse(Refusal.AMBIGUOUS_KEYSET, "The proof's short keyset id matches "
                          "several of the mint's keysets.", index)
        raise _refuse(Refusal.UNKNOWN_KEYSET, "The proof names a keyset this mint does not "
                      "have.", index)


def supports_locked_payments(info: Mapping[str, Any]) -> bool:
    """Whether a mint's NUT-06 info advertises NUT-10, 11 and 12. A mint without NUT-11 may
    let anyone spend a P2PK proof; without NUT-12 it proves nothing offline."""
    nuts = info.get("nuts") or {}
    return all(isinstance(nuts.get(n), Mapping) and nuts[n].get("supported") is True
               for n in ("10", "11", "12"))


# --- the whole token ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockPolicy:
    """What the proxy accepts: locked to ``pubkey``, a locktime at least ``locktime_margin``
    seconds ahead (and the keyset's final expiry too), bounded secrets and proof counts."""

    pubkey: str
    locktime_margin: int = DEFAULT_LOCKTIME_MARGIN
    max_secret_length: int = MAX_SECRET_LENGTH
    max_proofs: int = MAX_PROOFS


@dataclass(frozen=True, slots=True)
class VerifiedPayment:
    """A token that passed every offline check: what it is worth and how to record it."""

    mint: str
    unit: str
    amount: int  # sum of the proofs, in the unit
    fee: int  # the mint's input fee to swap them (NUT-02), in the unit
    ys: tuple[str, ...]  # hash_to_curve(secret) of each proof, in token order: replay keys
    keyset_ids: tuple[str, ...]  # each proof's full keyset id (tokens may carry short ones)
    locktimes: tuple[int | None, ...]  # each proof's locktime, None for a permanent lock
    proofs: tuple[Proof, ...] = field(repr=False)

    @property
    def net(self) -> int:
        """What the proofs are worth once swapped: amount less the input fee."""
        return self.amount - self.fee

    @property
    def redeem_by(self) -> int | None:
        """The earliest locktime: the batch swap must happen before it."""
        return min((t for t in self.locktimes if t is not None), default=None)


AlreadySeen = Callable[[Sequence[str]], Collection[str]]


def verify_payment(token: IncomingToken, mint: MintKeys, policy: LockPolicy, now: float,
                   already_seen: AlreadySeen | None = None) -> VerifiedPayment:
    """Every offline check of a locked token, cheapest first, all proofs through each stage
    before the next: mint and proof count; each proof's keyset (short ids resolved), expiry,
    unit, amount, secret length and fields; each lock (``parse_lock``, ``check_lock``); the Ys,
    none repeated; ``already_seen(ys)`` (the ledger's replay lookup: the Ys it knows); then the
    DLEQ of every proof. Raises LockRefused; returns what the caller stores and swaps later.

    Does not compare the amount with a price: ``VerifiedPayment.net`` is for the caller.
    """
    if token.mint != mint.mint:
        raise _refuse(Refusal.UNTRUSTED_MINT, f"Tokens from {token.mint} are not accepted for "
                      f"locked payments here; accepted mint: {mint.mint}.")
    proofs = token.proofs
    if len(proofs) > policy.max_proofs:
        raise _refuse(Refusal.TOO_MANY_PROOFS, f"The token holds {len(proofs)} proofs; at most "
                      f"{policy.max_proofs} are accepted.")
    not_before = now + policy.locktime_margin
    keysets = []
    for i, p in enumerate(proofs):
        keyset = mint.resolve(p.id, i)
        if keyset.final_expiry is not None and keyset.final_expiry < not_before:
            raise _refuse(Refusal.KEYSET_EXPIRING, "The proof's keyset expires too soon.", i)
        if keyset.unit != token.unit:
            raise _refuse(Refusal.WRONG_UNIT, f"The token says {token.unit[:16]!r} but its "
                          f"keyset is in {keyset.unit}.", i)
        if p.amount not in keyset.points:
            raise _refuse(Refusal.UNKNOWN_AMOUNT, f"The keyset has no key for amount "
                          f"{p.amount}.", i)
        if len(p.secret) > policy.max_secret_length:
            raise _refuse(Refusal.SECRET_TOO_LONG, f"The proof's secret is longer than "
                          f"{policy.max_secret_length} characters.", i)
        if len(p.C) != 66:
            raise _refuse(Refusal.MALFORMED_PROOF, "The proof's C is not a compressed point.", i)
        if p.p2pk_e:
            raise _refuse(Refusal.BLINDED_KEY, "The proof is locked to a blinded key (P2BK); "
                          "lock to the payment key itself.", i)
        if p.dleq is None:
            raise _refuse(Refusal.MISSING_DLEQ, "The proof carries no DLEQ proof (NUT-12); "
                          "send the token with its DLEQ proofs.", i)
        keysets.append(keyset)
    locktimes = []
    for i, p in enumerate(proofs):
        try:
            lock = parse_lock(p.secret)
            check_lock(lock, policy.pubkey, not_before)
        except LockRefused as e:
            raise _refuse(e.reason, str(e), i) from None
        locktimes.append(lock.locktime)
    points = [hash_to_curve(p.secret.encode()) for p in proofs]
    ys = tuple(y.format().hex() for y in points)
    if len(set(ys)) != len(ys):
        raise _refuse(Refusal.DUPLICATE_PROOF, "The token holds the same proof twice.")
    if already_seen is not None:
        seen = already_seen(ys)
        if seen:
            first = next(i for i, y in enumerate(ys) if y in seen)
            raise _refuse(Refusal.ALREADY_SPENT, "This token has already been spent.", first)
    for i, (p, y, keyset) in enumerate(zip(proofs, points, keysets, strict=True)):
        dleq = p.dleq
        assert dleq is not None  # checked above
        if not _dleq_ok(y, p.C, dleq.e, dleq.s, dleq.r, keyset.points[p.amount]):
            raise _refuse(Refusal.INVALID_DLEQ, "The proof's DLEQ proof does not verify: it "
                          "was not signed by this mint's key, or was altered.", i)
    return VerifiedPayment(
        mint.mint, token.unit, sum(p.amount for p in proofs),
        fee_for(k.input_fee_ppk for k in keysets), ys, tuple(k.id for k in keysets),
        tuple(locktimes), tuple(proofs))
