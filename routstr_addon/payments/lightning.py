"""Lightning top-ups: a bolt11 invoice from the primary mint's mint quote (NUT-04) funds a key.

An invoice moves ``unpaid`` → ``minting`` → ``credited``. The blinded outputs are written down
before the mint is asked to sign them (``minting``), so whatever happens next the proofs can be
had again from the mint (NUT-09 restore) and the key is credited exactly once: the move to
``credited`` is one conditional update in the same transaction as the credit. A timer checks
unpaid invoices and finishes interrupted ones, so a paid invoice is credited even if nobody
asks, and after a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from typing import Any

from routstr_addon.ecash.mint import MintError, MintUnreachable
from routstr_addon.ecash.tokens import UNIT_MSAT, amounts_for, nutshell
from routstr_addon.ecash.wallet import MintWallet, Wallet
from routstr_addon.errors import ApiError
from routstr_addon.ledger import KEY_PREFIX, InvoiceRecord, Ledger, hash_key
from routstr_addon.ledger.coreimport import core_invoice_key

__all__ = ["Invoices"]

logger = logging.getLogger(__name__)

MAX_INVOICE_SATS = 10_000_000


def invoice_key(invoice_id: str) -> str:
    """The key a ``create`` invoice funds, derived from the invoice id its creator holds."""
    return KEY_PREFIX + hashlib.sha256(f"lightning-invoice:{invoice_id}".encode()).hexdigest()


# Our states as routstr-core's clients poll them (``status == "paid"``).
_STATUS = {"unpaid": "pending", "minting": "pending", "credited": "paid", "expired": "expired"}


def payment_hash(bolt11_text: str) -> str | None:
    """The payment hash a bolt11 invoice carries (what wallets show), or None if unreadable."""
    import bolt11

    try:
        return str(bolt11.decode(bolt11_text).payment_hash)
    except Exception:
        return None


def _id_hash(invoice_id: str) -> str:
    return hashlib.sha256(invoice_id.encode()).hexdigest()


class _Busy(Exception):
    """Another process holds this invoice's minting."""


class _AlreadyCredited(Exception):
    """Another process credited this invoice first."""


class Invoices:
    def __init__(self, ledger: Ledger, wallet: Wallet) -> None:
        self.ledger = ledger
        self.wallet = wallet
        self._locks: dict[str, asyncio.Lock] = {}

    async def create(self, amount_sats: int, purpose: str,
                     key_hash: str | None = None) -> dict[str, Any]:
        """A mint quote at the primary mint, recorded to fund ``key_hash`` once paid: an
        existing key (``topup``), or a new one (``create``; by default the key derived from
        the invoice id, which the answer's ``invoice_id`` leads to)."""
        if purpose not in ("create", "topup"):
            raise ApiError(400, "purpose must be 'create' or 'topup'.", param="purpose",
                           code="invalid_purpose")
        if not 0 < amount_sats <= MAX_INVOICE_SATS:
            raise ApiError(400, f"amount_sats must be between 1 and {MAX_INVOICE_SATS}.",
                           param="amount_sats", code="invalid_amount")
        mint, quote = await self._quote(amount_sats)
        invoice_id = secrets.token_urlsafe(32)
        if purpose == "create" and key_hash is None:
            key_hash = hash_key(invoice_key(invoice_id))
        assert key_hash is not None
        expires_at = float(quote["expiry"]) if quote.get("expiry") else None
        self.ledger.invoices.add(_id_hash(invoice_id), quote["quote"], mint.url, amount_sats,
                                 quote["request"], purpose, key_hash, expires_at)
        return {"invoice_id": invoice_id, "bolt11": quote["request"], "amount_sats": amount_sats,
                "purpose": purpose, "expires_at": None if expires_at is None else int(expires_at),
                "state": "unpaid", "status": "pending",
                "payment_hash": payment_hash(quote["request"]) or quote["quote"]}

    async def _quote(self, amount_sats: int) -> tuple[MintWallet, dict[str, Any]]:
        """A mint quote from the primary mint or, while it is down, busy or rate-limited,
        from the next trusted mint that has sats (the invoice row records which)."""
        trouble: list[str] = []
        refused: Exception | None = None
        for mint in self.wallet.mints.values():
            try:
                await mint.ensure_loaded()
                mint.active("sat")
                return mint, await mint.client.mint_quote(amount_sats, "sat")
            except MintUnreachable as e:
                trouble.append(str(e))
                logger.warning("invoice: %s; trying the next mint", e)
            except Exception as e:  # this mint cannot make such an invoice (no sats keyset…)
                refused = refused or e
                logger.warning("invoice: the mint %s refused: %s", mint.url, e)
        if trouble:
            raise ApiError(503, f"No mint could make an invoice now: {'; '.join(trouble)}",
                           type="service_unavailable", code="mint_unavailable",
                           headers={"retry-after": "5"})
        raise ApiError(502, f"The mint could not make an invoice: {refused}",
                       type="upstream_error", code="mint_error")

    def _row(self, id_hash: str) -> InvoiceRecord | None:
        return self.ledger.invoices.get(id_hash)

    async def status(self, invoice_id: str) -> dict[str, Any]:
        """The invoice's state; checks the mint and credits the key if it has been paid."""
        row = self._row(_id_hash(invoice_id))
        if row is None:
            raise ApiError(404, "No such invoice.", code="invoice_not_found")
        row = await self._checked(row)
        answer = self._describe(row)
        if row.state == "credited" and row.purpose == "create":
            key = self._created_key(invoice_id, row)
            state = self.ledger.key(row.key_hash)
            answer["api_key"] = key
            answer["balance"] = state.balance_msat if state else 0
        return answer

    async def recover(self, bolt11_text: str) -> dict[str, Any]:
        """routstr-core's ``lightning/recover``: how the invoice of this bolt11 stands, settling
        it if it was paid and nobody noticed. The new key of a ``create`` invoice is shown only
        to the holder of its invoice id (the status URL): a bolt11 is known to whoever pays."""
        row = self.ledger.invoices.by_bolt11(bolt11_text.strip())
        if row is None:
            raise ApiError(404, "No such invoice.", code="invoice_not_found")
        return self._describe(await self._checked(row))

    async def _checked(self, row: InvoiceRecord) -> InvoiceRecord:
        if row.state in ("unpaid", "minting"):
            try:
                return await self.settle(row) or row
            except (MintUnreachable, MintError) as e:
                logger.warning("invoice check: %s", e)
        return row

    @staticmethod
    def _describe(row: InvoiceRecord) -> dict[str, Any]:
        """Both vocabularies: ours (``state``) and routstr-core's (``status``, ``paid_at``,
        ``payment_hash``, whole seconds)."""
        answer: dict[str, Any] = {
            "state": row.state, "status": _STATUS.get(row.state, row.state),
            "amount_sats": row.amount, "purpose": row.purpose,
            "payment_hash": payment_hash(row.bolt11) or row.quote,
            "created_at": int(row.created_at),
            "expires_at": None if row.expires_at is None else int(row.expires_at),
            "paid_at": None if row.paid_at is None else int(row.paid_at),
        }
        if row.state == "credited":
            answer["msats"] = row.amount * UNIT_MSAT[row.unit]
        return answer

    @staticmethod
    def _created_key(invoice_id: str, row: InvoiceRecord) -> str | None:
        """The key a paid ``create`` invoice made: ours, or routstr-core's for one it made."""
        for key in (invoice_key(invoice_id), core_invoice_key(invoice_id, row.quote)):
            if hash_key(key) == row.key_hash:
                return key
        return None

    async def settle(self, row: InvoiceRecord) -> InvoiceRecord | None:
        """Mint and credit a paid invoice (once); the updated row, or None if not paid yet."""
        lock = self._locks.setdefault(row.id_hash, asyncio.Lock())
        async with lock:
            row = self._row(row.id_hash) or row
            if row.state not in ("unpaid", "minting"):
                return row
            mint = self.wallet.mint(row.mint)
            if mint is None:
                logger.error("invoice at %s, a mint no longer trusted", row.mint)
                return None
            await mint.ensure_loaded()
            if row.state == "unpaid":
                quote = await mint.client.mint_quote_state(row.quote)
                if quote.get("state") not in ("PAID", "ISSUED"):
                    if row.expires_at and row.expires_at < time.time():
                        self.ledger.invoices.move(row.id_hash, "unpaid", "expired")
                        row.state = "expired"
                        return row
                    return None
            try:
                proofs = await self._mint(mint, row)
                self._credit(row, mint, proofs)
            except (_Busy, _AlreadyCredited):
                pass  # another process got there first
            finally:
                self._locks.pop(row.id_hash, None)
            return self._row(row.id_hash)

    async def _mint(self, mint: MintWallet, row: InvoiceRecord) -> list[Any]:
        nutshell()
        from cashu.core.crypto.secp import PrivateKey

        if row.state == "minting" and row.outputs:  # asked before: get the signatures back
            saved = json.loads(row.outputs)
            outputs, secret_list = saved["outputs"], saved["secrets"]
            rs = [PrivateKey(bytes.fromhex(r)) for r in saved["rs"]]
            try:
                signatures = await mint.client.mint(row.quote, outputs)
            except MintError:  # already issued to these outputs: restore them
                _, signatures = await mint.client.restore(outputs)
            return mint.unblind(signatures, outputs, secret_list, rs)
        keyset = mint.active(row.unit)
        outputs, secret_list, rs = mint.blind(amounts_for(row.amount), keyset)
        saved_json = json.dumps({"outputs": outputs, "secrets": secret_list,
                                 "rs": [r.to_hex() for r in rs]})
        if not self.ledger.invoices.start_minting(row.id_hash, saved_json):
            # another process is minting it: use its outputs
            current = self._row(row.id_hash)
            if current is None or current.state != "minting":
                raise _Busy
            return await self._mint(mint, current)
        row.state, row.outputs = "minting", saved_json
        signatures = await mint.client.mint(row.quote, outputs)
        return mint.unblind(signatures, outputs, secret_list, rs)

    def _credit(self, row: InvoiceRecord, mint: MintWallet, proofs: list[Any]) -> None:
        msat = sum(p.amount for p in proofs) * UNIT_MSAT[row.unit]
        with self.ledger.transaction(durable=True) as tx:
            if not self.ledger.invoices.credited_in(tx, row.id_hash):
                raise _AlreadyCredited  # rolled back: nothing changes
            self.wallet.store_in(tx, mint.url, row.unit, proofs, "unspent")
            note = f"lightning: invoice of {row.amount} {row.unit}"
            if row.purpose == "create":
                self.ledger.create_key_in(tx, row.key_hash, msat, note=note, backed=True)
            elif self.ledger.credit_in(tx, row.key_hash, msat, note) is None:
                raise RuntimeError("the key of a top-up invoice is gone")

    def cancel(self, invoice_id: str) -> None:
        """Forget an unpaid invoice (it will not be credited even if paid later)."""
        self.ledger.invoices.move(_id_hash(invoice_id), "unpaid", "expired")

    async def watch(self, every: float = 5.0) -> None:
        """Credit paid invoices nobody asked about, and finish interrupted ones (restart)."""
        while True:
            for id_hash in self.ledger.invoices.open_ids():
                row = self._row(id_hash)
                if row is None:
                    continue
                try:
                    await self.settle(row)
                except MintUnreachable as e:
                    logger.info("invoice watch: %s", e)
                    break
                except Exception:
                    logger.exception("invoice watch: could not settle an invoice")
            await asyncio.sleep(every)
