"""The proxy's Cashu wallet: one ``MintWallet`` per trusted mint, proofs kept in the ledger.

Proofs live in the ledger's database (table ``proofs``), not in a wallet file of their own, so
that receiving a token and crediting it are one transaction, and several proxy processes on one
PostgreSQL database share one wallet. nutshell provides the models and the blind-signature
crypto; the mint is spoken to through ``MintClient``.

Redeeming swaps the incoming proofs for new ones (NUT-03), net of the mint's input fee (NUT-02).
The new proofs can be cut to order: for an x-cashu request the swap makes outputs from which
any change between "all of it" and "all but the maximum cost" is a subset, so the change is
handed back later without a second mint round trip.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .ecash import (
    UNIT_MSAT,
    IncomingToken,
    Keyset,
    TokenError,
    amounts_for,
    change_friendly_amounts,
    fee_for,
    nutshell,
    pick_exact,
    proof_to_dict,
    sanitize_mint_url,
    serialize_token,
)
from .ledger import Ledger
from .mintapi import SPENT_CODE, MintClient, MintError, MintUnreachable

if TYPE_CHECKING:
    from cashu.core.base import Proof

__all__ = ["MintWallet", "Redeemed", "Wallet", "WalletError"]

logger = logging.getLogger(__name__)


class WalletError(Exception):
    """The wallet cannot do what was asked (not enough proofs, no keyset for a unit…)."""


@dataclass(slots=True)
class Redeemed:
    """Proofs received from the mint in exchange for a token, not yet stored."""

    mint: str
    unit: str
    amount: int  # of the new proofs, in the unit (the token's amount less the fee)
    fee: int
    proofs: list[Proof] = field(repr=False)

    @property
    def msat(self) -> int:
        return self.amount * UNIT_MSAT[self.unit]


class MintWallet:
    """What the proxy knows of one mint: its keysets and keys, and a client to reach it."""

    def __init__(self, url: str, timeout: float = 15.0) -> None:
        self.url = sanitize_mint_url(url)
        self.client = MintClient(self.url, timeout)
        self.keysets: dict[str, Keyset] = {}
        self._loading = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return bool(self.keysets)

    @property
    def units(self) -> set[str]:
        return {k.unit for k in self.keysets.values() if k.active}

    async def load(self) -> None:
        """Fetch the mint's keysets and the keys of those in units we take."""
        async with self._loading:
            nutshell()
            from cashu.core.crypto.secp import PublicKey

            listed = await self.client.keysets()
            keysets = dict(self.keysets)
            for info in listed:
                if info.get("unit") not in UNIT_MSAT:
                    continue
                known = keysets.get(info["id"])
                if known is None:
                    raw = await self.client.keys(info["id"])
                    keys = {int(a): PublicKey(bytes.fromhex(k)) for a, k in raw["keys"].items()}
                else:
                    keys = known.keys
                keysets[info["id"]] = Keyset(info["id"], info["unit"], bool(info.get("active")),
                                             int(info.get("input_fee_ppk") or 0), keys)
            self.keysets = keysets

    async def ensure_loaded(self) -> None:
        if not self.keysets:
            await self.load()

    def resolve(self, keyset_id: str) -> Keyset | None:
        """A keyset by its id, or by the short id a V4 token carries."""
        found = self.keysets.get(keyset_id)
        if found is None and keyset_id.startswith("01") and len(keyset_id) < 66:
            matches = [k for k in self.keysets.values() if k.id.startswith(keyset_id)]
            found = matches[0] if len(matches) == 1 else None
        return found

    def active(self, unit: str) -> Keyset:
        for keyset in self.keysets.values():
            if keyset.active and keyset.unit == unit:
                return keyset
        raise WalletError(f"the mint {self.url} has no active keyset in {unit}")

    def input_fee(self, proofs: Sequence[Proof]) -> int:
        return fee_for(self.keysets[p.id].input_fee_ppk if p.id in self.keysets else 0
                       for p in proofs)

    def blind(self, amounts: Sequence[int], keyset: Keyset) -> tuple[list[dict[str, Any]],
                                                                      list[str], list[Any]]:
        """Blinded outputs for ``amounts`` with fresh random secrets."""
        from cashu.core.crypto.b_dhke import step1_alice

        outputs, secret_list, rs = [], [], []
        for amount in amounts:
            secret = secrets.token_hex(32)
            b_, r = step1_alice(secret)
            outputs.append({"amount": amount, "id": keyset.id, "B_": b_.format().hex()})
            secret_list.append(secret)
            rs.append(r)
        return outputs, secret_list, rs

    def unblind(self, signatures: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]],
                secret_list: Sequence[str], rs: Sequence[Any]) -> list[Proof]:
        """Proofs from the mint's blind signatures, checking their DLEQ proofs (NUT-12)."""
        from cashu.core.base import DLEQWallet, Proof
        from cashu.core.crypto.b_dhke import alice_verify_dleq, step3_alice
        from cashu.core.crypto.secp import PrivateKey, PublicKey

        if len(signatures) != len(outputs):
            raise WalletError("the mint returned a different number of signatures")
        proofs = []
        for sig, out, secret, r in zip(signatures, outputs, secret_list, rs, strict=True):
            keyset = self.keysets.get(sig["id"])
            if keyset is None or sig["amount"] != out["amount"]:
                raise WalletError("the mint signed with an unknown keyset or amount")
            a = keyset.keys[sig["amount"]]
            c_ = PublicKey(bytes.fromhex(sig["C_"]))
            dleq = None
            if sig.get("dleq"):
                e = PrivateKey(bytes.fromhex(sig["dleq"]["e"]))
                s = PrivateKey(bytes.fromhex(sig["dleq"]["s"]))
                if not alice_verify_dleq(PublicKey(bytes.fromhex(out["B_"])), c_, e, s, a):
                    raise WalletError("the mint's DLEQ proof does not verify")
                dleq = DLEQWallet(e=sig["dleq"]["e"], s=sig["dleq"]["s"], r=r.to_hex())
            c = step3_alice(c_, r, a)
            proofs.append(Proof(id=sig["id"], amount=sig["amount"], secret=secret,
                                C=c.format().hex(), dleq=dleq))
        return proofs

    async def swap(self, inputs: Sequence[Proof], amounts: Sequence[int], unit: str) -> list[Proof]:
        """Exchange ``inputs`` for new proofs of ``amounts`` (which must add up to the inputs
        less the fee)."""
        keyset = self.active(unit)
        outputs, secret_list, rs = self.blind(amounts, keyset)
        signatures = await self.client.swap([proof_to_dict(p) for p in inputs], outputs)
        return self.unblind(signatures, outputs, secret_list, rs)

    def verify_incoming(self, proofs: Sequence[Proof]) -> None:
        """Check the DLEQ proofs a token carries (NUT-12), where it carries them."""
        from cashu.core.crypto.b_dhke import carol_verify_dleq
        from cashu.core.crypto.secp import PrivateKey, PublicKey

        for p in proofs:
            if p.dleq is None:
                continue
            keyset = self.keysets[p.id]
            key = keyset.keys.get(p.amount)
            if key is None or not carol_verify_dleq(
                    secret_msg=p.secret, C=PublicKey(bytes.fromhex(p.C)),
                    r=PrivateKey(bytes.fromhex(p.dleq.r)), e=PrivateKey(bytes.fromhex(p.dleq.e)),
                    s=PrivateKey(bytes.fromhex(p.dleq.s)), A=key):
                raise TokenError("A proof's DLEQ signature does not verify: the token is not "
                                 "from this mint or was altered.")


class Wallet:
    """All trusted mints (the first is the primary) and the proofs held at each."""

    def __init__(self, ledger: Ledger, mint_urls: Sequence[str], timeout: float = 15.0) -> None:
        if not mint_urls:
            raise ValueError("at least one mint is needed")
        self.ledger = ledger
        self.mints = {w.url: w for w in (MintWallet(u, timeout) for u in mint_urls)}
        self.primary = next(iter(self.mints.values()))
        self.timeout = timeout
        self.foreign: dict[str, MintWallet] = {}  # untrusted mints met in tokens, to melt at
        self._spending = asyncio.Lock()  # picking pool proofs for refunds is one at a time

    async def start(self) -> None:
        """Load every mint's keysets; a mint that does not answer is tried again on use."""
        results = await asyncio.gather(*(m.load() for m in self.mints.values()),
                                       return_exceptions=True)
        for mint, result in zip(self.mints.values(), results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("mint %s not loaded yet: %s", mint.url, result)

    async def close(self) -> None:
        for mint in [*self.mints.values(), *self.foreign.values()]:
            await mint.client.aclose()

    def mint(self, url: str) -> MintWallet | None:
        return self.mints.get(sanitize_mint_url(url))

    def stranger(self, url: str) -> MintWallet:
        """A client for an untrusted mint, to melt its tokens (never to hold its proofs)."""
        url = sanitize_mint_url(url)
        found = self.foreign.get(url)
        if found is None:
            found = self.foreign[url] = MintWallet(url, self.timeout)
        return found

    # -- money in --------------------------------------------------------------------------

    async def prepare(self, token: IncomingToken) -> MintWallet:
        """The trusted mint of a token, loaded, with the token's keyset ids expanded."""
        mint = self.mint(token.mint)
        if mint is None:
            raise TokenError(f"Tokens from {token.mint} are not accepted here; accepted mints: "
                             f"{', '.join(self.mints)}.", code="untrusted_mint")
        await mint.ensure_loaded()
        for p in token.proofs:
            keyset = mint.resolve(p.id)
            if keyset is None:
                await mint.load()  # a keyset the mint made since we last looked
                keyset = mint.resolve(p.id)
            if keyset is None:
                raise TokenError("The token names a keyset this mint does not have.")
            if keyset.unit != token.unit:
                raise TokenError(f"The token says {token.unit} but its keyset is in "
                                 f"{keyset.unit}.")
            p.id = keyset.id
        if token.unit not in UNIT_MSAT or token.unit not in mint.units:
            raise TokenError(f"Tokens in {token.unit} are not accepted; units: "
                             f"{', '.join(sorted(mint.units))}.", code="unsupported_unit")
        return mint

    def fee(self, mint: MintWallet, token: IncomingToken) -> int:
        return mint.input_fee(token.proofs)

    async def redeem(self, token: IncomingToken, keep_variable: int | None = None) -> Redeemed:
        """Swap a token's proofs for new ones at its mint; the token is spent afterwards.

        ``keep_variable`` (in the unit): shape the new proofs so that any part of them from
        the whole down to ``whole - keep_variable`` can later be handed back without the mint.
        Raises TokenError (bad or spent token) or MintUnreachable (nothing was redeemed, or
        ``sent``: the mint may have taken it).
        """
        mint = await self.prepare(token)
        mint.verify_incoming(token.proofs)
        fee = mint.input_fee(token.proofs)
        net = token.amount - fee
        if net <= 0:
            raise TokenError(f"The token ({token.amount} {token.unit}) does not cover the "
                             f"mint's fee of {fee} {token.unit}.")
        amounts = (amounts_for(net) if keep_variable is None
                   else change_friendly_amounts(net, keep_variable))
        try:
            proofs = await mint.swap(token.proofs, amounts, token.unit)
        except MintError as e:
            if e.code == SPENT_CODE or "spent" in e.detail.lower():
                raise TokenError("This token has already been spent.",
                                 code="token_already_spent") from None
            raise TokenError(f"The mint refused the token: {e.detail}") from None
        return Redeemed(mint.url, token.unit, net, fee, proofs)

    # -- the pool ----------------------------------------------------------------------------

    def store_in(self, cur: Any, mint: str, unit: str, proofs: Sequence[Proof], state: str,
                 owner: str | None = None) -> None:
        """Record proofs inside a ledger transaction."""
        now = time.time()
        sql = self.ledger.sql("INSERT INTO proofs (secret, mint, unit, keyset_id, amount, c, dleq, "
                              "state, owner, created_at, updated_at) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        for p in proofs:
            dleq = json.dumps(p.dleq.model_dump()) if p.dleq is not None else None
            cur.execute(sql, (p.secret, mint, unit, p.id, p.amount, p.C, dleq, state, owner,
                              now, now))

    def owned_in(self, cur: Any, owner: str) -> list[Proof]:
        cur.execute(self.ledger.sql("SELECT secret, keyset_id, amount, c, dleq FROM proofs "
                                    "WHERE owner = ? AND state IN ('held', 'reserved')"),
                    (owner,))
        return [_proof(row) for row in cur.fetchall()]

    def set_state_in(self, cur: Any, proofs: Sequence[Proof], state: str,
                     owner: str | None) -> None:
        sql = self.ledger.sql("UPDATE proofs SET state = ?, owner = ?, updated_at = ? "
                              "WHERE secret = ?")
        now = time.time()
        for p in proofs:
            cur.execute(sql, (state, owner, now, p.secret))

    def cut_in(self, cur: Any, owner: str, mint: str, unit: str, amount: int) -> str | None:
        """Hand back ``amount`` (in the unit) of the proofs ``owner`` holds, as a token;
        the rest join the pool. No mint call: the proofs were shaped for this when redeemed.
        Returns None for nothing to hand back. Raises WalletError if no exact subset exists."""
        held = self.owned_in(cur, owner)
        token = None
        if amount > 0:
            chosen = pick_exact([p.amount for p in held], amount)
            if chosen is None:
                raise WalletError(f"no exact change of {amount} {unit} in the held proofs")
            picked = [held[i] for i in chosen]
            token = serialize_token(mint, unit, picked)
            self.set_state_in(cur, picked, "sent", owner)
            keep = [p for i, p in enumerate(held) if i not in set(chosen)]
        else:
            keep = held
        self.set_state_in(cur, keep, "unspent", None)
        return token

    def balances(self) -> dict[tuple[str, str], int]:
        """What the proxy holds per (mint, unit), in the unit: proofs not handed out or spent."""
        cur = self.ledger.db.connection().cursor()
        cur.execute("SELECT mint, unit, SUM(amount) FROM proofs "
                    "WHERE state IN ('unspent', 'held', 'reserved') GROUP BY mint, unit")
        return {(m, u): int(total) for m, u, total in cur.fetchall()}

    def held_msat(self) -> int:
        return sum(v * UNIT_MSAT.get(u, 1000) for (_, u), v in self.balances().items())

    async def send(self, mint_url: str, unit: str, amount: int, owner: str) -> tuple[str, int]:
        """A token of ``amount`` (in the unit) from the pool: exact proofs if the pool has
        them, else a swap that splits off the amount. The swap's input fee is taken from the
        amount. Returns (token, fee).

        Proofs are claimed for ``owner`` with conditional updates, so two processes (or the
        proxy and the CLI) never hand out the same proof; on any failure before the mint may
        have acted, the claimed proofs go back to the pool."""
        mint = self.mints[mint_url]
        await mint.ensure_loaded()
        keyset = mint.active(unit)  # before claiming anything
        async with self._spending:
            inputs, exact = self._claim(mint, unit, amount, owner)
            if exact:
                with self.ledger.transaction() as cur:
                    self.set_state_in(cur, inputs, "sent", owner)
                return serialize_token(mint.url, unit, inputs), 0
            total = sum(p.amount for p in inputs)
            fee = mint.input_fee(inputs)
            send_amount = amount - fee
            amounts = amounts_for(send_amount) + amounts_for(total - fee - send_amount)
            try:
                if send_amount <= 0:
                    raise WalletError(f"{amount} {unit} does not cover the mint's fee of {fee}")
                fresh = await mint.swap(inputs, amounts, keyset.unit)
            except MintUnreachable as e:
                if not e.sent:
                    self._unclaim(inputs, owner)
                raise  # if it may have been sent, the inputs stay reserved for recovery
            except BaseException:
                self._unclaim(inputs, owner)
                raise
            send_part = fresh[: len(amounts_for(send_amount))]
            keep_part = fresh[len(send_part):]
            with self.ledger.transaction() as cur:
                self.set_state_in(cur, inputs, "spent", owner)
                self.store_in(cur, mint.url, unit, send_part, "sent", owner)
                self.store_in(cur, mint.url, unit, keep_part, "unspent")
            return serialize_token(mint.url, unit, send_part), fee

    def _claim(self, mint: MintWallet, unit: str, amount: int,
               owner: str) -> tuple[list[Proof], bool]:
        """Pick pool proofs for ``amount`` and mark them reserved for ``owner``; retried if
        another process claimed one of them first."""
        for _ in range(5):
            try:
                with self.ledger.transaction() as cur:
                    return self._pick_in(cur, mint, unit, amount, owner)
            except _Contended:
                continue
        raise WalletError("the wallet's proofs are busy; try again")

    def _pick_in(self, cur: Any, mint: MintWallet, unit: str, amount: int,
                 owner: str) -> tuple[list[Proof], bool]:
        cur.execute(self.ledger.sql("SELECT secret, keyset_id, amount, c, dleq FROM proofs "
                                    "WHERE mint = ? AND unit = ? AND state = 'unspent' "
                                    "ORDER BY amount DESC"), (mint.url, unit))
        pool = [_proof(row) for row in cur.fetchall()]
        chosen = pick_exact([p.amount for p in pool], amount)
        exact = chosen is not None
        if chosen is None:  # the smallest proofs that cover it, with room for the fee
            chosen, total = [], 0
            for i in sorted(range(len(pool)), key=lambda j: pool[j].amount):
                chosen.append(i)
                total += pool[i].amount
                if total >= amount + mint.input_fee([pool[j] for j in chosen]):
                    break
            else:
                raise WalletError(f"the wallet holds {total} {unit} at {mint.url}, "
                                  f"less than {amount}")
        picked = [pool[i] for i in chosen]
        claim = self.ledger.sql("UPDATE proofs SET state = 'reserved', owner = ?, updated_at = ? "
                                "WHERE secret = ? AND state = 'unspent'")
        now = time.time()
        for p in picked:
            cur.execute(claim, (owner, now, p.secret))
            if cur.rowcount != 1:
                raise _Contended  # rolls the whole claim back
        return picked, exact

    def _unclaim(self, proofs: Sequence[Proof], owner: str) -> None:
        """Give claimed proofs back to the pool, only those still reserved for ``owner``."""
        sql = self.ledger.sql("UPDATE proofs SET state = 'unspent', owner = NULL, updated_at = ? "
                              "WHERE secret = ? AND state = 'reserved' AND owner = ?")
        with self.ledger.transaction() as cur:
            now = time.time()
            for p in proofs:
                cur.execute(sql, (now, p.secret, owner))


class _Contended(Exception):
    """Another process claimed a proof between our read and our update."""


def _proof(row: Sequence[Any]) -> Proof:
    from cashu.core.base import DLEQWallet, Proof

    secret, keyset_id, amount, c, dleq = row
    return Proof(id=keyset_id, amount=int(amount), secret=secret, C=c,
                 dleq=DLEQWallet(**json.loads(dleq)) if dleq else None)
