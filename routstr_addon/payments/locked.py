"""x-cashu with no mint on the request path: ecash locked to the proxy's payment key.

The x-cashu 402 asks (NUT-18 ``nut10``) for proofs locked to the payment key with no other
spending path. Such a token is accepted offline (``accept``): every check of
``ecash.p2pk.verify_payment`` (trusted mint with NUT-10/11/12, known keyset, the lock, the
DLEQ proof of every proof, no Y seen before), then the proofs, the payment, the request's key
and its reservation in one transaction, where the proofs' Y as primary key makes a replay
impossible across processes. No mint call.

Change comes from the change pool (``cut_change``): unlocked proofs the proxy already holds,
each handed out once (a conditional update) even across processes. What the pool cannot cover
stays on the request's key, claimable with ``POST /v1/balance/refund`` and the same X-Cashu.

Off the request path, ``redeem`` swaps received proofs at the mint in batches, earliest
locktime first, signing their NUT-11 witnesses; the outputs are derived from the wallet's seed
and saved before the call, so a lost answer is recovered (NUT-09); a proof the mint says is
spent already is marked lost, logged as an error and counted. ``refill`` keeps the pool
stocked with small proofs of every amount.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from routstr_addon.ecash.mint import SPENT_CODE, MintError, MintUnreachable
from routstr_addon.ecash.p2pk import (
    LockPolicy,
    LockRefused,
    Refusal,
    sign_witnesses,
    verify_payment,
)
from routstr_addon.ecash.tokens import UNIT_MSAT, amounts_for, serialize_token
from routstr_addon.ecash.wallet import MintWallet, Wallet, WalletError, proof_of
from routstr_addon.ledger import DATABASE_ERRORS, LockedRecord, Tx, hash_key

if TYPE_CHECKING:
    from cashu.core.base import Proof

    from routstr_addon.ecash.p2pk import VerifiedPayment
    from routstr_addon.ecash.tokens import IncomingToken
    from routstr_addon.ledger import Ledger

__all__ = ["POOL_LEVELS", "Accepted", "LockedPayments", "RedeemResult"]

logger = logging.getLogger(__name__)

POOL_LEVELS = 11  # the change pool keeps proofs of 1, 2, 4 … 1024 (in the unit)
REDEEM_BATCH = 100  # proofs per batch swap
_HAND_OUT_TRIES = 5
RELOAD_EVERY = 60.0  # seconds between reloads of a mint's keysets for unknown ones


@dataclass(frozen=True, slots=True)
class Accepted:
    """A locked token accepted and its request reserved: the key and what it still has."""

    key_hash: str
    msat: int  # credited: the proofs less the mint's input fee to swap them
    available_msat: int  # after the reservation
    verified: VerifiedPayment


@dataclass(slots=True)
class RedeemResult:
    redeemed: int = 0  # proofs swapped
    amount: int = 0  # their amount (in their unit)
    lost: int = 0  # proofs the mint said were spent already
    recovered: int = 0  # batches whose lost answer was found again
    pending: int = 0  # batches whose outcome is still unknown


class LockedPayments:
    """Locked x-cashu payments: offline acceptance, change from the pool, batch redemption."""

    def __init__(self, ledger: Ledger, wallet: Wallet, pool_per_amount: int = 8) -> None:
        if wallet.payment_key is None:
            raise ValueError("locked payments need the wallet's seed")
        self.ledger = ledger
        self.wallet = wallet
        self.key = wallet.payment_key
        self.policy = LockPolicy(self.key.public_hex)
        self.pool_per_amount = pool_per_amount
        self.lost_total = 0  # proofs lost since start (the mint had them spent)
        self._reloaded: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def offered(self) -> bool:
        """Whether the 402 asks for locked ecash: the primary mint enforces the locks."""
        return self.wallet.primary.takes_locked

    def takes(self, token: IncomingToken) -> bool:
        """Whether a token goes this way: locked (its proofs' secrets are NUT-10) at a trusted
        mint that enforces locks. Unlocked tokens keep the swap path."""
        from routstr_addon.ecash.p2pk import looks_locked

        if not token.proofs or not looks_locked(token.proofs[0].secret):
            return False
        mint = self.wallet.mint(token.mint)
        return mint is not None and mint.loaded and mint.takes_locked

    # -- on the request path: no mint call -----------------------------------------------------

    def verify(self, token: IncomingToken) -> VerifiedPayment:
        """Every offline check, cheapest first; raises LockRefused (a TokenError: 400)."""
        mint = self.wallet.mint(token.mint)
        assert mint is not None
        try:
            return verify_payment(token, mint.offline_keys(), self.policy, time.time(),
                                  already_seen=self.ledger.locked.seen)
        except LockRefused as e:
            if e.reason is Refusal.UNKNOWN_KEYSET:
                self._reload_soon(mint)
            raise

    def _reload_soon(self, mint: MintWallet) -> None:
        """A keyset we do not know: maybe the mint made a new one. Its keysets are fetched
        again in the background (at most once a minute), never on the request path."""
        now = time.monotonic()
        if now - self._reloaded.get(mint.url, -RELOAD_EVERY) < RELOAD_EVERY:
            return
        self._reloaded[mint.url] = now
        try:
            task = asyncio.get_running_loop().create_task(mint.load())
        except RuntimeError:  # no loop (a direct call): the next start loads them
            return
        self._tasks.add(task)
        task.add_done_callback(self._reloaded_done)

    def _reloaded_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("reloading a mint's keysets failed: %s", task.exception())

    def accept(self, token: IncomingToken, verified: VerifiedPayment, request_id: str,
               amount_msat: int, model: str | None) -> Accepted | None:
        """Store the proofs, the payment, the request's key and its reservation of
        ``amount_msat``, all in one transaction; None if the token's value after fees does
        not cover it. Raises a database error if it could not be written (a replay loses the
        race on the proofs' Y: ``replayed`` tells)."""
        per_unit = UNIT_MSAT[verified.unit]
        msat = verified.net * per_unit
        if msat < amount_msat:
            return None
        key_hash = hash_key(f"xcashu:{request_id}:{token.hash}")
        records = [LockedRecord(y, p.secret, verified.mint, verified.unit, keyset_id, p.amount,
                                p.C, json.dumps(p.dleq.model_dump()) if p.dleq else None,
                                locktime)
                   for y, p, keyset_id, locktime in zip(verified.ys, verified.proofs,
                                                        verified.keyset_ids, verified.locktimes,
                                                        strict=True)]
        with self.ledger.transaction(durable=True) as tx:
            self.ledger.payments.record(tx, token.hash, "xcashu", key_hash, verified.mint,
                                        verified.unit, verified.amount, verified.fee, msat,
                                        request_id)
            self.ledger.locked.add(tx, token.hash, records)
            self.ledger.create_key_in(tx, key_hash, msat, label="x-cashu", backed=True,
                                      note=f"x-cashu: locked token of {verified.amount} "
                                      f"{verified.unit}")
            available = self.ledger.reserve_in(tx, key_hash, amount_msat, request_id, model)
            if available is None:
                raise RuntimeError("a fresh key refused its reservation")
        return Accepted(key_hash, msat, available, verified)

    def replayed(self, verified: VerifiedPayment) -> bool:
        """After a failed write: whether another request took these proofs first."""
        try:
            return bool(self.ledger.locked.seen(verified.ys))
        except DATABASE_ERRORS:
            return False

    # -- change from the pool ------------------------------------------------------------------

    def cut_change_in(self, tx: Tx, owner: str, mint: str, unit: str,
                      amount: int) -> tuple[str | None, int]:
        """Up to ``amount`` (in the unit) of pool proofs as a token for ``owner``, inside the
        caller's transaction, each proof handed out once across processes. Returns (token,
        amount cut): less than asked when the pool lacks the proofs (the rest stays with the
        caller's key)."""
        if amount <= 0:
            return None, 0
        for _ in range(_HAND_OUT_TRIES):
            picked = self._pick(tx, mint, unit, amount)
            if not picked:
                return None, 0
            secrets = [p.secret for p in picked]
            if self.ledger.locked.hand_out(tx, secrets, owner):
                return (serialize_token(mint, unit, [proof_of(p) for p in picked]),
                        sum(p.amount for p in picked))
            self.ledger.locked.take_back(tx, secrets, owner)  # another process was first
        logger.warning("change pool contended; the change of %s stays on its key", owner)
        return None, 0

    def _pick(self, tx: Any, mint: str, unit: str, amount: int) -> list[Any]:
        """Pool proofs adding up to at most ``amount``, largest first (greedy over powers of
        two: exact whenever the pool has the proofs)."""
        picked: list[Any] = []
        left = amount
        level = amount.bit_length() - 1
        while left > 0 and level >= 0:
            value = 1 << level
            need = left // value
            if need:
                found = self.ledger.locked.pool_of_amount(tx, mint, unit, value, need)
                picked.extend(found)
                left -= value * len(found)
            level -= 1
        return picked

    # -- off the request path ------------------------------------------------------------------

    async def redeem(self, limit: int = REDEEM_BATCH, recover_all: bool = False) -> RedeemResult:
        """Swap received locked proofs at their mints, a batch per mint and unit; first settle
        the batches whose outcome was not known (``recover_all``: also those claimed just
        now, when no other process can be swapping them)."""
        result = RedeemResult()
        # A batch another process may still be swapping is left alone: only those claimed
        # longer ago than a mint call can last are settled here.
        settled_by = time.time() if recover_all else time.time() - 4 * self.wallet.timeout - 30
        for batch in self.ledger.locked.batches(settled_by):
            await self._recover(batch, result)
        for mint in self.wallet.mints.values():
            if not mint.loaded:
                continue
            for unit in sorted(mint.units):
                batch = "redeem-" + uuid.uuid4().hex
                records = self.ledger.locked.claim_batch(batch, mint.url, unit, limit)
                if records:
                    await self._swap(mint, unit, batch, records, result)
        return result

    def _outputs(self, mint: MintWallet, unit: str, net: int) -> tuple[str, int, list[int]]:
        """The batch's output amounts (first what the change pool lacks), with counters
        reserved for them: (keyset id, first counter, amounts)."""
        keyset = mint.active(unit)
        amounts = self._pool_shortfall(mint.url, unit, net) if unit == "sat" or \
            unit == "msat" else []
        amounts += amounts_for(net - sum(amounts))
        counters = self.wallet.counters
        if counters is None:
            raise WalletError("redeeming locked proofs needs the wallet's seed")
        return keyset.id, counters.reserve(keyset.id, len(amounts)), amounts

    def _pool_shortfall(self, mint: str, unit: str, budget: int) -> list[int]:
        """Amounts that bring the change pool up to ``pool_per_amount`` of each level, within
        ``budget``, the smallest first."""
        if self.pool_per_amount <= 0:
            return []
        counts = self.ledger.locked.pool_counts(mint, unit)
        wanted: list[int] = []
        for level in range(POOL_LEVELS):
            value = 1 << level
            for _ in range(max(0, self.pool_per_amount - counts.get(value, 0))):
                if value > budget:
                    return wanted
                wanted.append(value)
                budget -= value
        return wanted

    async def _swap(self, mint: MintWallet, unit: str, batch: str,
                    records: list[LockedRecord], result: RedeemResult) -> None:
        proofs = [_locked_proof(r) for r in records]
        fee = mint.input_fee(proofs)
        net = sum(p.amount for p in proofs) - fee
        if net <= 0:
            with self.ledger.transaction() as tx:
                self.ledger.locked.unclaim(tx, batch)
            return
        keyset_id, start, amounts = self._outputs(mint, unit, net)
        saved = json.dumps({"keyset": keyset_id, "start": start, "amounts": amounts})
        # Before the call: if its answer is lost, these outputs find the signatures again.
        self.ledger.proofs.save_lost_swap(batch, mint.url, unit, net, fee, saved)
        outputs, secret_list, rs = mint.derived_outputs(keyset_id, start, amounts)
        inputs = sign_witnesses(proofs, self.key)
        from routstr_addon.ecash.tokens import proof_to_dict

        try:
            signatures = await mint.client.swap([proof_to_dict(p) for p in inputs], outputs)
        except MintUnreachable as e:
            if not e.sent:
                self._give_back(batch)
            else:
                result.pending += 1
            logger.warning("batch swap at %s: %s", mint.url, e)
            return
        except MintError as e:
            await self._refused(mint, batch, records, e, result)
            return
        fresh = mint.unblind(signatures, outputs, secret_list, rs)
        self._redeemed(mint, unit, batch, records, fresh, result)

    def _redeemed(self, mint: MintWallet, unit: str, batch: str, records: list[LockedRecord],
                  fresh: list[Proof], result: RedeemResult) -> None:
        with self.ledger.transaction(durable=True) as tx:
            self.wallet.store_in(tx, mint.url, unit, fresh, "unspent")
            self.ledger.locked.set_state(tx, [r.y for r in records], "redeemed")
        self.ledger.proofs.forget_lost_swap(batch)
        result.redeemed += len(records)
        result.amount += sum(r.amount for r in records)
        logger.info("redeemed %d locked proofs (%d %s) at %s", len(records),
                    sum(r.amount for r in records), unit, mint.url)

    def _give_back(self, batch: str) -> None:
        with self.ledger.transaction() as tx:
            self.ledger.locked.unclaim(tx, batch)
        self.ledger.proofs.forget_lost_swap(batch)

    async def _refused(self, mint: MintWallet, batch: str, records: list[LockedRecord],
                       error: MintError, result: RedeemResult) -> None:
        """The mint refused the batch: the proofs it says are spent are lost (someone spent
        them: a locktime passed, or the mint honoured another path); the rest wait."""
        if not (error.code == SPENT_CODE or "spent" in error.detail.lower()):
            logger.error("batch swap of %d locked proofs refused by %s: %s", len(records),
                         mint.url, error)
            self._give_back(batch)
            return
        states = await mint.client.check_state([r.y for r in records])
        spent = {str(s.get("Y")) for s in states if str(s.get("state")) == "SPENT"}
        lost = [r for r in records if r.y in spent]
        with self.ledger.transaction() as tx:
            self.ledger.locked.set_state(tx, [r.y for r in lost], "lost")
            self.ledger.locked.unclaim(tx, batch)
        self.ledger.proofs.forget_lost_swap(batch)
        self.lost_total += len(lost)
        result.lost += len(lost)
        if lost:
            logger.error("ALERT: %d locked proofs (%d) at %s were spent by someone else; "
                         "marked lost (%d lost since start)", len(lost),
                         sum(r.amount for r in lost), mint.url, self.lost_total)

    async def _recover(self, batch: str, result: RedeemResult) -> None:
        """A batch whose answer was lost: the mint signs its saved outputs again if it swapped
        (NUT-09); if it did not, the proofs wait for the next batch."""
        records = self.ledger.locked.in_batch(batch)
        saved_text = self.ledger.proofs.lost_swap(batch)
        if not records:
            if saved_text is not None:
                self.ledger.proofs.forget_lost_swap(batch)
            return
        mint = self.wallet.mint(records[0].mint)
        if mint is None or saved_text is None:
            self._give_back(batch)
            return
        saved = json.loads(saved_text)
        outputs, secret_list, rs = mint.derived_outputs(saved["keyset"], saved["start"],
                                                        saved["amounts"])
        try:
            signed, signatures = await mint.client.restore(outputs)
        except (MintError, MintUnreachable) as e:
            logger.warning("recovering batch %s at %s: %s", batch, mint.url, e)
            result.pending += 1
            return
        if signatures and len(signatures) == len(outputs):
            by_b = {o["B_"]: sig for o, sig in zip(signed, signatures, strict=True)}
            ordered = [by_b[o["B_"]] for o in outputs if o["B_"] in by_b]
            if len(ordered) == len(outputs):
                fresh = mint.unblind(ordered, outputs, secret_list, rs)
                self._redeemed(mint, records[0].unit, batch, records, fresh, result)
                result.recovered += 1
                return
        self._give_back(batch)  # never swapped: the proofs are still ours to swap

    async def refill(self) -> int:
        """Top the change pool up from the pool's larger proofs (one swap at the primary
        mint) when any amount is below half of ``pool_per_amount``. Returns the amount of the
        small proofs made."""
        mint = self.wallet.primary
        if self.pool_per_amount <= 0 or not mint.loaded:
            return 0
        unit = "sat" if "sat" in mint.units else (sorted(mint.units) or ["sat"])[0]
        counts = self.ledger.locked.pool_counts(mint.url, unit)
        low = max(1, self.pool_per_amount // 2)
        if all(counts.get(1 << level, 0) >= low for level in range(POOL_LEVELS)):
            return 0
        top = 1 << (POOL_LEVELS - 1)
        spare = sum(a * n for a, n in counts.items() if a > top)
        wanted = self._pool_shortfall(mint.url, unit, spare)
        if not wanted:
            return 0
        try:
            return await self.wallet.reshape(mint.url, unit, wanted, above=top,
                                             owner="refill-" + uuid.uuid4().hex)
        except (WalletError, MintError, MintUnreachable) as e:
            logger.warning("change pool refill failed: %s", e)
            return 0


def _locked_proof(record: LockedRecord) -> Proof:
    from cashu.core.base import DLEQWallet, Proof

    return Proof(id=record.keyset_id, amount=record.amount, secret=record.secret, C=record.c,
                 dleq=DLEQWallet(**json.loads(record.dleq)) if record.dleq else None)
