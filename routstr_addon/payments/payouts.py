"""The operator's money loop: earnings paid out to a Lightning address, expired keys refunded.

Profit is the operator's margin (``Ledger.books``: what the wallet holds less backed key
balances, refunds not yet handed out and payouts under way). When it reaches ``MINIMUM_PAYOUT``
it is paid to ``RECEIVE_LN_ADDRESS``: an invoice is asked of the address for the profit less the
Lightning fee reserve and the mint's input fee, and paid by melting pool proofs at the primary
mint.

Every payment is a ``payouts`` row written before the mint is asked. If the answer is lost the
row stays ``pending`` and is settled from the mint's quote state on the next run: never paid
twice, never counted as paid when it was not. A refund debits the key in the same transaction
that writes its row; if the payment fails for good, the key is credited back.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from routstr_addon.amounts import sats
from routstr_addon.ecash.mint import MintError, MintUnreachable
from routstr_addon.ecash.tokens import UNIT_MSAT
from routstr_addon.ecash.wallet import Melted, Wallet, WalletError
from routstr_addon.ledger import Books, Ledger, PayoutRecord
from routstr_addon.netguard import NetPolicy
from routstr_addon.payments.cashu import Payments
from routstr_addon.payments.lnurl import LnAddressError, invoice_for
from routstr_addon.settings import Config

__all__ = ["Payouts"]

logger = logging.getLogger(__name__)

class Payouts:
    def __init__(self, ledger: Ledger, wallet: Wallet, config: Config,
                 payments: Payments | None = None) -> None:
        self.ledger = ledger
        self.wallet = wallet
        self.config = config
        self.payments = payments
        self.net = NetPolicy(config.allow_private_ln_addresses, config.nostr.tor_proxy_url)

    # -- the books -----------------------------------------------------------------------------

    def books(self) -> Books:
        """The operator's books, as every other reader sees them."""
        return self.ledger.books(list(self.wallet.mints))

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = [p.as_dict() for p in self.ledger.payouts.recent(limit)]
        for row in rows:
            row.pop("outputs")
        return rows

    # -- payouts -------------------------------------------------------------------------------

    async def run(self, dry_run: bool = False) -> dict[str, Any]:
        """Settle what is pending, then pay the profit out if it reaches the minimum."""
        settled = await self.reconcile()
        books = self.books()
        result: dict[str, Any] = {"books": books.as_json(), "settled": settled, "payout": None}
        address = self.config.receive_ln_address
        if not address:
            result["skipped"] = "no RECEIVE_LN_ADDRESS"
            return result
        minimum = self.config.minimum_payout_sats * 1000
        mint = self.wallet.primary
        pool = books.held(mint.url, "sat") * UNIT_MSAT["sat"]
        unspent = self.ledger.proofs.unspent_total(mint.url, "sat") * UNIT_MSAT["sat"]
        available = min(books.margin_msat, unspent, pool)
        if available < minimum:
            result["skipped"] = (f"profit {sats(books.margin_msat)} sats is below "
                                 f"MINIMUM_PAYOUT ({self.config.minimum_payout_sats})")
            return result
        if dry_run:
            result["would_pay_sats"] = available // 1000
            return result
        result["payout"] = await self.pay(address, available // 1000, kind="payout")
        return result

    async def pay(self, address: str, budget_sats: int, kind: str,
                  key_hash: str | None = None, msat: int = 0) -> dict[str, Any]:
        """Pay ``address`` from the pool: an invoice for what is left of ``budget_sats`` once
        the Lightning fee reserve and the mint's input fee are taken, then the melt."""
        mint = self.wallet.primary
        await mint.ensure_loaded()
        ppk = max((k.input_fee_ppk for k in mint.keysets.values() if k.unit == "sat"),
                  default=0)
        # A first guess at the fee reserve (what nutshell asks by default: 1 %, at least 2);
        # the mint's melt quote says, and the invoice is asked again if it was too little.
        target = budget_sats - max(2, -(-budget_sats // 100)) - (ppk and 1)
        # The operator's own address is trusted; a user's refund address is fetched only over
        # https from public addresses (or .onion via Tor), checked on the socket (netguard).
        client = NetPolicy.trusted() if kind == "payout" else self.net.client()
        async with client:
            for _ in range(4):
                if target <= 0:
                    raise WalletError(f"{budget_sats} sats do not cover the fees of a payment")
                bolt11 = await invoice_for(address, target * 1000, client)
                quote = await mint.client.melt_quote(bolt11, "sat")
                need = int(quote["amount"]) + int(quote.get("fee_reserve") or 0)
                slack = -(-(ppk * max(1, need.bit_length())) // 1000)  # input fee, worst case
                if need + slack <= budget_sats:
                    break
                target -= need + slack - budget_sats
            else:
                raise WalletError("the Lightning fees keep changing; try again later")
        payout_id = uuid.uuid4().hex
        with self.ledger.transaction(durable=True) as tx:
            debited = (kind != "refund" or key_hash is None or self.ledger.debit_in(
                tx, key_hash, msat, f"refund to {address}", request_id=payout_id,
                kind="refund") is not None)
            if not debited:
                raise WalletError("the key's balance changed")
            self.ledger.payouts.add(tx, payout_id, kind, key_hash, address, mint.url,
                                    int(quote["amount"]), int(quote.get("fee_reserve") or 0),
                                    msat, bolt11, quote["quote"])

        def record_outputs(outputs_json: str | None) -> None:
            self.ledger.payouts.set_outputs(payout_id, outputs_json)

        try:
            melted = await self.wallet.melt(mint.url, "sat", quote, payout_id, record_outputs)
        except MintUnreachable as e:
            if e.sent:  # the mint may have paid: settled from its quote state later
                self._set(payout_id, "pending", error=str(e))
                return self._row(payout_id)
            return self._fail(payout_id, str(e))
        except (MintError, WalletError) as e:
            return self._fail(payout_id, str(e))
        return self._record(payout_id, melted)

    def _record(self, payout_id: str, melted: Melted) -> dict[str, Any]:
        if melted.state == "PAID":
            self._set(payout_id, "paid", fee_paid=melted.fee_paid)
            row = self._row(payout_id)
            logger.info("%s of %d sats to %s paid (fees %d sats)", row["kind"], row["amount"],
                        row["destination"], melted.fee_paid)
            return row
        if melted.state == "UNPAID":
            return self._fail(payout_id, "the payment failed")
        self._set(payout_id, "pending", error=f"melt {melted.state.lower()}")
        return self._row(payout_id)

    def _fail(self, payout_id: str, error: str) -> dict[str, Any]:
        """A payment that did not happen: its proofs are the pool's again, and a refund's
        amount goes back on its key."""
        row = self._record_of(payout_id)
        with self.ledger.transaction(durable=True) as tx:
            if self.ledger.payouts.fail_in(tx, payout_id, error) and row.kind == "refund" \
                    and row.key_hash:
                self.ledger.credit_in(tx, row.key_hash, row.msat,
                                      f"refund to {row.destination} failed",
                                      request_id=payout_id)
        logger.warning("%s %s to %s failed: %s", row.kind, payout_id, row.destination, error)
        return self._row(payout_id)

    def _set(self, payout_id: str, state: str, fee_paid: int = 0,
             error: str | None = None) -> None:
        self.ledger.payouts.set_state(payout_id, state, fee_paid, error)

    def _record_of(self, payout_id: str) -> PayoutRecord:
        row = self.ledger.payouts.get(payout_id)
        assert row is not None
        return row

    def _row(self, payout_id: str) -> dict[str, Any]:
        return self._record_of(payout_id).as_dict()

    async def reconcile(self) -> list[dict[str, Any]]:
        """Settle pending payments from the mint's quote states."""
        settled = []
        for payout_id in self.ledger.payouts.pending_ids():
            row = self._record_of(payout_id)
            if row.quote is None:
                settled.append(self._fail(payout_id, "interrupted before the melt"))
                continue
            try:
                if not self.ledger.proofs.has_reserved(payout_id):
                    # Nothing left claimed: the outcome was applied, or no proof was taken.
                    mint = self.wallet.mints[row.mint]
                    state = (await mint.client.melt_quote_state(row.quote))["state"]
                    melted = Melted(str(state).upper(), row.amount, row.fee_reserve,
                                    row.fee_paid, 0)
                else:
                    melted = await self.wallet.finish_melt(row.mint, row.unit, row.quote,
                                                           payout_id, row.outputs)
            except (MintUnreachable, MintError) as e:
                logger.info("payout %s still pending: %s", payout_id, e)
                continue
            settled.append(self._record(payout_id, melted))
        return settled

    # -- refunds of expired keys ------------------------------------------------------------------

    async def refund_to_address(self, key_hash: str) -> dict[str, Any]:
        """``POST /v1/balance/refund`` for a key with a refund address: its available balance
        (whole sats) paid there over Lightning, fees taken from it; answered as routstr-core
        does, with the ``recipient``. A payment that fails puts the amount back on the key."""
        from routstr_addon.errors import ApiError

        state = self.ledger.key(key_hash)
        if state is None or not state.refund_address:
            raise ApiError(400, "This key has no refund address.", code="no_refund_address")
        if not state.backed:
            raise ApiError(403, "This key holds credit granted by the operator, which cannot be "
                           "withdrawn.", type="permission_error", code="not_refundable")
        if state.reserved_msat:
            raise ApiError(409, "This key has requests in flight; refund once they are done.",
                           code="requests_in_flight")
        amount = state.available_msat // 1000
        if amount <= 0:
            raise ApiError(400, "Nothing to refund: the balance is below one sat.",
                           code="nothing_to_refund")
        address = state.refund_address
        try:
            row = await self.pay(address, amount, kind="refund", key_hash=key_hash,
                                 msat=amount * 1000)
        except LnAddressError as e:
            raise ApiError(502, f"The refund address could not be paid: {e}. The balance is "
                           "still on the key.", type="upstream_error",
                           code="refund_address_failed") from None
        except (WalletError, MintError, MintUnreachable) as e:
            raise ApiError(503, f"The refund could not be paid now: {e}. The balance is still "
                           "on the key.", type="service_unavailable", code="refund_failed",
                           headers={"retry-after": "30"}) from None
        if row["state"] == "failed":
            raise ApiError(502, f"The Lightning payment to {address} failed; the balance is "
                           "back on the key.", type="upstream_error", code="refund_failed")
        return {"recipient": address, "msats": row["msat"], "sats": row["msat"] // 1000,
                "paid_sats": row["amount"], "fee": row["fee_paid"], "state": row["state"]}

    async def refund_expired(self) -> list[dict[str, Any]]:
        """Expired keys with a balance: paid to their refund address, or, without one, made
        into a token their owner can claim (``POST /v1/balance/refund``). Once each."""
        done = []
        for key in self.ledger.accounts.expired_with_balance(time.time()):
            key_hash, address, balance = key.key_hash, key.refund_address, key.balance_msat
            try:
                if address:  # a Lightning address or an LNURL
                    sats = int(balance) // 1000
                    row = await self.pay(address, sats, kind="refund", key_hash=key_hash,
                                         msat=sats * 1000)
                    done.append(row)
                elif self.payments is not None:
                    refund = await self.payments.refund(key_hash)
                    done.append({"kind": "token", "key_hash": key_hash, "msat": refund["msats"]})
            except (LnAddressError, WalletError, MintError, MintUnreachable) as e:
                logger.warning("refund of expired key %s… not made: %s", key_hash[:12], e)
            except Exception:
                logger.exception("refund of expired key %s… failed", key_hash[:12])
        return done

    async def loop(self, every: float, work: str) -> None:
        """Run ``work`` (``payouts`` or ``refunds``) every ``every`` seconds, from now."""
        import asyncio

        while True:
            try:
                if work == "payouts":
                    result = await self.run()
                    if result.get("payout"):
                        logger.info("payout: %s", json.dumps(result["payout"], default=str))
                else:
                    await self.refund_expired()
            except (LnAddressError, WalletError, MintError, MintUnreachable) as e:
                logger.warning("%s: %s", work, e)
            except Exception:
                logger.exception("%s failed", work)
            await asyncio.sleep(every)
