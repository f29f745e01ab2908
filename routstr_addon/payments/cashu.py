"""Cashu money rules: tokens as keys, top-ups, refunds, and per-request x-cashu payments.

Every rule keeps two promises. A token is credited once: it is swapped at its mint first, and
the payment row keyed by its hash makes a second credit impossible. A user's token is never
lost: nothing is stored before the mint has swapped it, and once it has, the new proofs and
the credit are written together; if that write fails, the proofs go back to the user as a
token in the error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from routstr_addon.amounts import sats
from routstr_addon.ecash.mint import SPENT_CODE, MintBusy, MintError, MintUnreachable
from routstr_addon.ecash.tokens import (
    UNIT_MSAT,
    IncomingToken,
    TokenError,
    parse_token,
    proof_to_dict,
    serialize_token,
    token_hash,
)
from routstr_addon.ecash.wallet import Redeemed, Wallet, WalletError
from routstr_addon.errors import ApiError, PaymentRequired, invalid_api_key
from routstr_addon.ledger import (
    DATABASE_ERRORS,
    KEY_PREFIX,
    KeyState,
    Ledger,
    RefundRecord,
    Tx,
    hash_key,
)
from routstr_addon.netguard import refused
from routstr_addon.payments.lightning import Invoices
from routstr_addon.payments.lnurl import LnAddressError, check_refund_address
from routstr_addon.payments.locked import LockedPayments

__all__ = ["KeyTerms", "Payments", "XCashu", "XCashuPayer", "derived_key", "token_error"]

logger = logging.getLogger(__name__)

RETRY_AFTER = "5"


def derived_key(token_text: str) -> str:
    """The API key a token becomes: ``sk-`` + its hash, usable in its place afterwards."""
    return KEY_PREFIX + token_hash(token_text)


MAX_KEY_LIFETIME = 10 * 365.25 * 86400  # seconds: a Key-Expiry-Time further out is refused


@dataclass(frozen=True, slots=True)
class KeyTerms:
    """What a user may ask of the key a token becomes (headers ``Key-Expiry-Time`` and
    ``Refund-LNURL``, as routstr-core takes them): when it expires and where its balance is
    refunded then."""

    expires_at: float | None = None
    refund_address: str | None = None

    @classmethod
    def parse(cls, expiry: str | None, refund: str | None,
              now: float | None = None) -> KeyTerms:
        """From the raw header values; 400 for an expiry that is not a finite Unix time in the
        next ten years, or a refund address that is no Lightning address or LNURL."""
        expires_at = None
        if expiry is not None and expiry.strip():
            now = time.time() if now is None else now
            try:
                expires_at = float(expiry.strip())
            except ValueError:
                expires_at = math.nan
            if not math.isfinite(expires_at) or not now < expires_at <= now + MAX_KEY_LIFETIME:
                raise ApiError(400, "Key-Expiry-Time must be a Unix time (seconds) in the "
                               "future and at most ten years ahead.", param="Key-Expiry-Time",
                               code="invalid_expiry")
        address = None
        if refund is not None and refund.strip():
            try:
                address = check_refund_address(refund)
            except LnAddressError as e:
                raise ApiError(400, f"Refund-LNURL must be a Lightning address (user@domain) or "
                               f"an LNURL: {e}", param="Refund-LNURL",
                               code="invalid_refund_address") from None
        return cls(expires_at, address)


def token_error(e: TokenError) -> ApiError:
    return ApiError(400, str(e), code=e.code, param="token")


def mint_down(e: MintUnreachable) -> ApiError:
    logger.warning("mint unreachable: %s", e)
    if isinstance(e, MintBusy):
        return ApiError(503, "The mint is busy and did not take your token, which is still "
                        "yours. Try again in a few seconds.", type="service_unavailable",
                        code="mint_unavailable", headers={"retry-after": RETRY_AFTER})
    message = ("The mint did not answer; your token was not redeemed and is still yours. "
               "Try again shortly.") if not e.sent else (
               "The mint did not answer in time. If it redeemed your token, the value is kept: "
               "send the same token again once the mint answers.")
    return ApiError(503, message, type="service_unavailable", code="mint_unavailable",
                    headers={"retry-after": RETRY_AFTER})


@dataclass(slots=True)
class XCashu:
    """An x-cashu request's payment: its token, and the proofs it was swapped into."""

    token_hash: str
    key_hash: str
    mint: str
    unit: str
    msat: int  # credited (the token less the mint's fee)
    change: str | None = None
    change_msat: int = 0
    closed: bool = False
    offline: bool = False  # a locked token, accepted offline: change comes from the pool


@dataclass(slots=True)
class XCashuPayer:
    """An x-cashu request's payer, as the meter sees it (``metering.meter.Payer``): the key
    its token was redeemed into, and the change once the request is settled."""

    payments: Payments
    payment: XCashu
    request_id: str
    available_msat: int | None = None  # already reserved with the payment (locked tokens)

    @property
    def key_hash(self) -> str:
        return self.payment.key_hash

    def change(self) -> str | None:
        return self.payments.close_xcashu(self.payment, self.request_id).change

    def early_change(self, reserved_msat: int) -> str | None:
        return self.payments.early_change(self.payment, self.request_id, reserved_msat)


class Payments:
    def __init__(self, ledger: Ledger, wallet: Wallet, invoices: Invoices | None = None,
                 swap_untrusted: bool = False, locked: LockedPayments | None = None) -> None:
        self.ledger = ledger
        self.wallet = wallet
        self.locked = locked  # None: every x-cashu token is swapped on the request path
        self.invoices = invoices
        self.swap_untrusted = swap_untrusted and invoices is not None
        self._first_use: dict[str, asyncio.Future[None]] = {}

    # -- receiving ---------------------------------------------------------------------------

    async def _redeem(self, token: IncomingToken, keep_variable: int | None = None) -> Redeemed:
        try:
            return await self.wallet.redeem(token, keep_variable)
        except TokenError as e:
            raise token_error(e) from None
        except MintUnreachable as e:
            raise mint_down(e) from None
        except (MintError, WalletError) as e:
            raise ApiError(502, f"The mint could not redeem the token ({e}); it was not spent "
                           "and is still yours.", type="upstream_error", code="mint_error",
                           headers={"retry-after": RETRY_AFTER}) from None

    def _stored_or_returned(self, redeemed: Redeemed, write: Any) -> None:
        """Run ``write`` (the ledger transaction recording a redeem); if it fails, the new proofs
        go back to the user, whose token is spent by now."""
        try:
            write()
        except ApiError:
            raise
        except Exception:
            logger.exception("recording a redeemed token failed; returning its value")
            token = serialize_token(redeemed.mint, redeemed.unit, redeemed.proofs)
            raise ApiError(503, "The payment could not be recorded; your token's value is "
                           "returned in the X-Cashu header.", type="service_unavailable",
                           code="ledger_unavailable",
                           headers={"x-cashu": token, "retry-after": RETRY_AFTER}) from None

    def _payment_in(self, tx: Tx, kind: str, token: IncomingToken, redeemed: Redeemed,
                    key_hash: str, request_id: str | None = None) -> None:
        self.ledger.payments.record(tx, token.hash, kind, key_hash, redeemed.mint,
                                    redeemed.unit, token.amount, redeemed.fee, redeemed.msat,
                                    request_id)

    def parse(self, text: str) -> IncomingToken:
        try:
            return parse_token(text)
        except TokenError as e:
            raise token_error(e) from None

    def seen(self, token: IncomingToken) -> bool:
        return self.ledger.payments.seen(token.hash)

    async def key_for_token(self, text: str, expiry: str | None = None,
                            refund: str | None = None) -> str:
        """The API key for a token used as one: on first use the token is redeemed into it.
        Concurrent first uses wait for one redeem; across processes the mint decides.
        ``expiry`` and ``refund`` (the raw ``Key-Expiry-Time`` and ``Refund-LNURL`` headers)
        set the key's terms on first use, as at ``/v1/balance/create``."""
        api_key = derived_key(text)
        key_hash = hash_key(api_key)
        if self.ledger.key(key_hash) is not None:
            return api_key
        pending = self._first_use.get(key_hash)
        if pending is not None:
            await asyncio.shield(pending)
            return api_key
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._first_use[key_hash] = future
        try:
            if self.ledger.key(key_hash) is None:
                terms = KeyTerms.parse(expiry, refund)
                await self._open_key(text, key_hash, "key", terms.expires_at,
                                     terms.refund_address)
            future.set_result(None)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: waiters get their own answer below
            raise
        finally:
            del self._first_use[key_hash]
        return api_key

    async def _open_key(self, text: str, key_hash: str, kind: str,
                        expires_at: float | None = None,
                        refund_address: str | None = None, label: str | None = None) -> None:
        token = self.parse(text)
        if self.swap_untrusted and self.wallet.mint(token.mint) is None:
            await self._swap_in(token, "create", key_hash)
            return
        try:
            redeemed = await self._redeem(token)
        except ApiError as e:
            if e.code == "token_already_spent" and self.ledger.key(key_hash) is not None:
                return  # another process redeemed it into this very key
            raise

        def write() -> None:
            with self.ledger.transaction(durable=True) as tx:
                self._payment_in(tx, kind, token, redeemed, key_hash)
                self.wallet.store_in(tx, redeemed.mint, redeemed.unit, redeemed.proofs,
                                     "unspent")
                self.ledger.create_key_in(tx, key_hash, redeemed.msat,
                                          note=f"{kind}: token of {token.amount} {token.unit}",
                                          expires_at=expires_at, refund_address=refund_address,
                                          label=label, backed=True)

        self._stored_or_returned(redeemed, write)

    async def create(self, text: str, expires_at: float | None = None,
                     refund_address: str | None = None,
                     label: str | None = None) -> tuple[str, KeyState]:
        """``POST /v1/balance/create``: a new key funded by a token (the token's own key)."""
        api_key = derived_key(text)
        key_hash = hash_key(api_key)
        if self.ledger.key(key_hash) is not None:
            raise ApiError(400, "This token has already been spent (it funds an existing key).",
                           code="token_already_spent", param="initial_balance_token")
        await self._open_key(text, key_hash, "create", expires_at, refund_address, label)
        state = self.ledger.key(key_hash)
        assert state is not None
        return api_key, state

    async def topup(self, key_hash: str, text: str) -> int:
        """``POST /v1/balance/topup``: credit a token to an existing key; the msat credited."""
        if self.ledger.key(key_hash) is None:
            raise invalid_api_key()
        token = self.parse(text)
        if self.seen(token):
            raise ApiError(400, "This token has already been spent.", code="token_already_spent")
        if self.swap_untrusted and self.wallet.mint(token.mint) is None:
            return await self._swap_in(token, "topup", key_hash)
        redeemed = await self._redeem(token)

        def write() -> None:
            with self.ledger.transaction(durable=True) as tx:
                self._payment_in(tx, "topup", token, redeemed, key_hash)
                self.wallet.store_in(tx, redeemed.mint, redeemed.unit, redeemed.proofs,
                                     "unspent")
                if self.ledger.credit_in(tx, key_hash, redeemed.msat,
                                         f"topup: token of {token.amount} {token.unit}") is None:
                    raise KeyError(key_hash)

        self._stored_or_returned(redeemed, write)
        return redeemed.msat

    async def _swap_in(self, token: IncomingToken, purpose: str, key_hash: str) -> int:
        """A token from an untrusted mint, moved to the primary over Lightning: an invoice of
        the primary's (recorded to credit ``key_hash`` once paid) is paid by melting the token
        at its own mint. The Lightning fee and both mints' fees come off the amount.
        Returns the msat credited."""
        assert self.invoices is not None
        stranger = self.wallet.stranger(token.mint)
        try:
            await stranger.ensure_loaded()
        except MintUnreachable as e:
            if refused(e):  # the token names a mint on a private network, or plain http
                raise ApiError(400, f"Tokens of {token.mint} cannot be taken: this proxy only "
                               "reaches other mints over https at public addresses (or .onion).",
                               code="untrusted_mint", param="token") from None
            raise mint_down(e) from None
        for p in token.proofs:
            keyset = stranger.resolve(p.id)
            if keyset is None or keyset.unit != token.unit:
                raise ApiError(400, "The token names a keyset its mint does not have.",
                               code="invalid_token", param="token")
            p.id = keyset.id
        if token.unit != "sat":
            raise ApiError(400, "Only sat tokens can be swapped from another mint.",
                           code="unsupported_unit", param="token")
        available = token.amount - stranger.input_fee(token.proofs)
        target = available - max(2, available // 100)  # a first guess at the Lightning fee
        last_refusal = ""
        for _ in range(3):  # a melt the mint refuses (route not found…) is quoted again
            invoice, target = await self._melt_quote(stranger, token, purpose, key_hash,
                                                     available, target)
            try:
                await stranger.client.melt(invoice["melt_quote"],
                                           [proof_to_dict(p) for p in token.proofs])
                break
            except MintError as e:
                self.invoices.cancel(invoice["invoice_id"])
                if e.code == SPENT_CODE or "spent" in e.detail.lower():
                    raise ApiError(400, "This token has already been spent.",
                                   code="token_already_spent", param="token") from None
                last_refusal = e.detail
                if not await self._unspent(stranger, token):
                    raise ApiError(502, f"The token's mint refused to pay out ({e.detail}) "
                                   "and could not confirm the token unspent; send the same "
                                   "token again shortly.", type="upstream_error",
                                   code="mint_error") from None
                logger.info("melt at %s refused (%s); quoting again", token.mint, e.detail)
            except MintUnreachable as e:
                if not e.sent:
                    self.invoices.cancel(invoice["invoice_id"])
                raise mint_down(e) from None  # if it paid, the invoice watcher credits the key
        else:
            raise ApiError(502, f"The token's mint could not pay out over Lightning "
                           f"({last_refusal}). Your token was not spent and is still yours.",
                           type="upstream_error", code="swap_failed", param="token",
                           headers={"retry-after": RETRY_AFTER})
        for _ in range(100):
            status = await self.invoices.status(invoice["invoice_id"])
            if status["state"] == "credited":
                logger.info("swapped %d sat from %s: %d credited, fees %d", token.amount,
                            token.mint, target, token.amount - target)
                return target * 1000
            await asyncio.sleep(0.1)
        raise ApiError(503, "The token was paid out by its mint; the credit follows as soon as "
                       "the payment settles.", type="service_unavailable", code="swap_pending",
                       headers={"retry-after": RETRY_AFTER})

    async def _melt_quote(self, stranger: Any, token: IncomingToken, purpose: str,
                          key_hash: str, available: int,
                          target: int) -> tuple[dict[str, Any], int]:
        """An invoice of ours for ``target`` sats (lowered until the token's mint can pay it
        with its fees from ``available``) and the mint's melt quote for it, as
        ``invoice["melt_quote"]``."""
        assert self.invoices is not None
        for _ in range(3):
            if target <= 0:
                raise ApiError(400, f"The token ({token.amount} sat) is too small to move from "
                               f"{token.mint} to this proxy's mint over Lightning.",
                               code="token_too_small", param="token")
            invoice = await self.invoices.create(target, purpose, key_hash)
            try:
                quote = await stranger.client.melt_quote(invoice["bolt11"], "sat")
            except (MintError, MintUnreachable) as e:
                self.invoices.cancel(invoice["invoice_id"])
                raise ApiError(502, f"The token's mint cannot pay out: {e}. Your token was not "
                               "spent and is still yours.", type="upstream_error",
                               code="mint_error", headers={"retry-after": RETRY_AFTER}) from None
            needed = int(quote["amount"]) + int(quote.get("fee_reserve") or 0)
            if needed <= available:
                invoice["melt_quote"] = quote["quote"]
                return invoice, target
            self.invoices.cancel(invoice["invoice_id"])
            target -= needed - available
        raise ApiError(400, "The Lightning fees to move this token keep changing; try again.",
                       code="token_too_small", param="token")

    async def _unspent(self, stranger: Any, token: IncomingToken) -> bool:
        """Whether every proof of the token is still unspent at its mint (NUT-07)."""
        from routstr_addon.ecash.p2pk import y_hex

        try:
            states = await stranger.client.check_state([y_hex(p.secret) for p in token.proofs])
        except (MintError, MintUnreachable):
            return False
        return bool(states) and all(s.get("state") == "UNSPENT" for s in states)

    # -- paying back -------------------------------------------------------------------------

    async def refund(self, key_hash: str) -> dict[str, Any]:
        """``POST /v1/balance/refund``: the key's whole available balance as a token.

        The key is debited first, in the same transaction that records the refund, so the
        same balance cannot be refunded twice; asking again returns the same token."""
        state = self.ledger.key(key_hash)
        if state is None:
            raise invalid_api_key()
        mint = self.wallet.primary
        unit = "sat" if "sat" in mint.units or not mint.units else sorted(mint.units)[0]
        per_unit = UNIT_MSAT[unit]
        amount = state.available_msat // per_unit
        if not state.backed:
            raise ApiError(403, "This key holds credit granted by the operator, which cannot be "
                           "withdrawn as ecash.", type="permission_error", code="not_refundable")
        if state.reserved_msat:
            raise ApiError(409, "This key has requests in flight; refund once they are done.",
                           code="requests_in_flight")
        if amount <= 0:
            last = self._last_refund(key_hash)
            if last is not None:
                return await self._finish_refund(last)
            raise ApiError(400, "Nothing to refund: the balance is below one "
                           f"{unit}.", code="nothing_to_refund")
        refund_id = uuid.uuid4().hex
        with self.ledger.transaction(durable=True) as tx:
            if self.ledger.debit_in(tx, key_hash, amount * per_unit, "refund",
                                    request_id=refund_id, kind="refund") is None:
                raise ApiError(409, "The balance changed; try again.", code="balance_changed")
            refund = self.ledger.refunds.add(tx, refund_id, key_hash, amount * per_unit,
                                             mint.url, unit)
        return await self._finish_refund(refund)

    def _last_refund(self, key_hash: str) -> RefundRecord | None:
        return self.ledger.refunds.last(key_hash)

    async def _finish_refund(self, refund: RefundRecord) -> dict[str, Any]:
        """Make (or return the already made) token of a refund."""
        token = refund.token
        fee = refund.fee
        if token is None:
            per_unit = UNIT_MSAT[refund.unit]
            try:
                token, fee = await self.wallet.send(refund.mint, refund.unit,
                                                    refund.msat // per_unit, refund.id)
            except MintUnreachable as e:
                raise mint_down(e) from None
            except (MintError, WalletError) as e:
                logger.error("refund %s could not be made: %s", refund.id, e)
                raise ApiError(503, "The refund is recorded but its token could not be made "
                               "yet; ask again shortly.", type="service_unavailable",
                               code="refund_pending", headers={"retry-after": RETRY_AFTER}) from e
            self.ledger.refunds.made(refund.id, token, fee)
        per_unit = UNIT_MSAT[refund.unit]
        return {"token": token, "msats": refund.msat, "sats": refund.msat // 1000,
                "unit": refund.unit, "mint": refund.mint,
                "fee": fee, "amount": refund.msat // per_unit - fee}

    async def stored_change(self, text: str) -> dict[str, Any] | None:
        """The change of an x-cashu payment, for a client that could not read it.

        If the change could not be cut when the request ended, what is left on the payment's
        key is paid out now, from the pool (a mint swap if the pool has no exact proofs)."""
        hashed = token_hash(text)
        row = self.ledger.payments.xcashu(hashed)
        if row is None:
            return None
        change, change_msat, unit, mint, key_hash, request_id = (
            row.change, row.change_msat, row.unit, row.mint, row.key_hash, row.request_id)
        state = self.ledger.key(key_hash)
        if change is None and state is not None and not state.reserved_msat and \
                state.available_msat >= UNIT_MSAT[unit]:
            payment = XCashu(hashed, key_hash, mint, unit, row.msat)
            try:  # cut from the proofs the token was swapped into, as at the end of a request
                closed = self.close_xcashu(payment, request_id)
                change, change_msat = closed.change, closed.change_msat
            except WalletError:  # they cannot make it: pay it out of the pool
                with self.ledger.transaction() as tx:
                    self.wallet.set_state_in(tx, self.wallet.owned_in(tx, request_id),
                                             "unspent", None)
                made = await self.refund(key_hash)
                change, change_msat = made["token"], made["msats"]
                with self.ledger.transaction() as tx:
                    self.ledger.payments.set_change(tx, hashed, change, change_msat)
        # A locked payment whose change the pool could not wholly cover: the rest is on its
        # key, paid out now as a refund (and the same refund when asked again).
        rest = None
        state = self.ledger.key(key_hash)
        if state is not None and not state.reserved_msat:
            if state.available_msat >= UNIT_MSAT[unit] and change is not None:
                rest = await self.refund(key_hash)
            elif (last := self._last_refund(key_hash)) is not None and change is not None:
                rest = await self._finish_refund(last)
        if rest is not None and rest["token"] == change:  # the change itself was a refund
            rest = None
        parts = [t for t in (row.early_change, change, rest and rest["token"]) if t]
        if len(parts) > 1:  # a stream's change in two parts, or a rest: all, as one token
            merged = serialize_token(mint, unit, [p for t in parts for p in parse_token(t).proofs])
            return {"token": merged, "msats": int(change_msat) + row.early_change_msat
                    + (rest["msats"] if rest else 0), "unit": unit, "mint": mint,
                    "rest": change, "early": row.early_change}
        return {"token": change, "msats": int(change_msat), "unit": unit, "mint": mint}

    # -- x-cashu -------------------------------------------------------------------------------

    def requirement(self, required_msat: int) -> tuple[int, str]:
        """What a token must carry for a request: (amount, unit) at the primary mint, with
        room for the mint's input fee."""
        mint = self.wallet.primary
        unit = "sat" if "sat" in mint.units or not mint.units else sorted(mint.units)[0]
        amount = -(-required_msat // UNIT_MSAT[unit])
        ppk = max((k.input_fee_ppk for k in mint.keysets.values()
                   if k.active and k.unit == unit), default=0)
        if ppk:
            amount += -(-(ppk * max(1, amount.bit_length())) // 1000)
        return amount, unit

    async def open_xcashu(self, text: str, request_id: str, required_msat: int,
                          model: str | None = None) -> XCashuPayer:
        """Redeem an x-cashu token, worth at least ``required_msat``, into a key of its own
        (the meter then reserves the request on it, as on any key). Returns the payer that
        gives the change back once the request is settled."""
        token = self.parse(text)
        if self.seen(token):
            raise ApiError(400, "This token has already been spent.", code="token_already_spent",
                           param="x-cashu")
        if self.locked is not None and self.locked.takes(token):
            return self._open_locked(token, request_id, required_msat, model)
        try:
            mint = await self.wallet.prepare(token)
        except TokenError as e:
            if e.code in ("untrusted_mint", "unsupported_unit"):
                raise self.payment_required(required_msat, str(e), model) from None
            raise token_error(e) from None
        except MintUnreachable as e:
            raise mint_down(e) from None
        per_unit = UNIT_MSAT[token.unit]
        net_msat = (token.amount - mint.input_fee(token.proofs)) * per_unit
        if net_msat < required_msat:
            raise self.payment_required(
                required_msat, f"The token is worth {sats(net_msat)} sats after the mint's "
                f"fee; this request needs up to {sats(required_msat)} sats.", model)
        redeemed = await self._redeem(token, keep_variable=-(-required_msat // per_unit))
        key_hash = hash_key(f"xcashu:{request_id}:{token.hash}")
        payment = XCashu(token.hash, key_hash, redeemed.mint, redeemed.unit, redeemed.msat)

        def write() -> None:
            with self.ledger.transaction(durable=True) as tx:
                self._payment_in(tx, "xcashu", token, redeemed, key_hash, request_id)
                self.wallet.store_in(tx, redeemed.mint, redeemed.unit, redeemed.proofs, "held",
                                     request_id)
                self.ledger.create_key_in(tx, key_hash, redeemed.msat,
                                          note=f"x-cashu: token of {token.amount} {token.unit}",
                                          label="x-cashu", backed=True)

        self._stored_or_returned(redeemed, write)
        return XCashuPayer(self, payment, request_id)

    def _open_locked(self, token: IncomingToken, request_id: str, required_msat: int,
                     model: str | None) -> XCashuPayer:
        """A token locked to the payment key: checked offline, stored with the request's
        reservation in one transaction. No mint call."""
        assert self.locked is not None
        try:
            verified = self.locked.verify(token)
        except TokenError as e:
            if e.code in ("untrusted_mint", "wrong_unit", "unknown_keyset"):
                raise self.payment_required(required_msat, str(e), model) from None
            raise ApiError(400, str(e), code=e.code, param="x-cashu") from None
        try:
            accepted = self.locked.accept(token, verified, request_id, required_msat, model)
        except DATABASE_ERRORS as e:
            if self.locked.replayed(verified):
                raise ApiError(400, "This token has already been spent.",
                               code="token_already_spent", param="x-cashu") from None
            logger.error("request %s: recording a locked payment failed: %s", request_id, e)
            raise ApiError(503, "The payment could not be recorded; your token was not taken "
                           "and is still yours. Try again shortly.", type="service_unavailable",
                           code="ledger_unavailable", headers={"retry-after": RETRY_AFTER}) \
                from None
        if accepted is None:
            net = verified.net * UNIT_MSAT[verified.unit]
            raise self.payment_required(
                required_msat, f"The token is worth {sats(net)} sats after the mint's fee; "
                f"this request needs up to {sats(required_msat)} sats.", model)
        payment = XCashu(token.hash, accepted.key_hash, verified.mint, verified.unit,
                         accepted.msat, offline=True)
        return XCashuPayer(self, payment, request_id, accepted.available_msat)

    def payment_required(self, required_msat: int, message: str,
                         model: str | None = None) -> ApiError:
        """402 with a NUT-18 payment request for what this request needs."""
        from cashu.core.base import NUT10Option, PaymentRequest
        from cashu.core.nuts.nut18 import serialize

        amount, unit = self.requirement(required_msat)
        lock = None
        if self.locked is not None and self.locked.offered:  # pay offline: lock it to us
            lock = NUT10Option(k="P2PK", d=self.locked.key.public_hex)
        request = PaymentRequest(a=amount, u=unit, m=list(self.wallet.mints), s=True,
                                 d="Routstr request payment", nut10=lock)
        return PaymentRequired(f"{message} Pay at least {amount} {unit} from "
                               f"{', '.join(self.wallet.mints)} in an X-Cashu header.",
                               serialize(request), required_msat, model)

    def early_change(self, payment: XCashu, request_id: str, reserved_msat: int) -> str | None:
        """A stream's change known at its start: the payment less the reserved maximum
        (floored to the unit), cut now from the proofs the swap shaped, for the ``X-Cashu``
        response header; the rest follows when the stream is settled. No mint call."""
        per_unit = UNIT_MSAT[payment.unit]
        with self.ledger.transaction() as tx:
            state = self.ledger.key(payment.key_hash)
            if state is None or payment.closed:
                return None
            units = (state.balance_msat - reserved_msat) // per_unit
            if units <= 0:
                return None
            if payment.offline:
                token, units = self._from_pool(tx, request_id, payment, units)
                if token is None:
                    return None
            else:
                token = self.wallet.cut_part_in(tx, request_id, payment.mint, payment.unit,
                                                units)
            if self.ledger.debit_in(tx, payment.key_hash, units * per_unit,
                                    "x-cashu change at the stream's start", request_id,
                                    kind="change") is None:
                raise WalletError("the payment's key cannot pay the change")
            self.ledger.payments.set_early_change(tx, payment.token_hash, token,
                                                  units * per_unit)
        return token

    def _from_pool(self, tx: Tx, request_id: str, payment: XCashu,
                   units: int) -> tuple[str | None, int]:
        """Change for a locked payment, cut from the change pool inside ``tx``."""
        assert self.locked is not None
        token, cut = self.locked.cut_change_in(tx, request_id, payment.mint, payment.unit,
                                               units)
        if cut < units:
            logger.warning("request %s: the change pool lacked %d of %d %s; the rest stays "
                           "claimable (POST /v1/balance/refund with the same X-Cashu)",
                           request_id, units - cut, units, payment.unit)
        return token, cut

    def close_xcashu(self, payment: XCashu, request_id: str) -> XCashu:
        """After the request is settled or released: what is left on its key goes back as
        change (floored to the token's unit; the fraction is the operator's), cut from the
        proofs the token was swapped into. Idempotent."""
        if payment.closed:
            return payment
        per_unit = UNIT_MSAT[payment.unit]
        with self.ledger.transaction() as tx:
            state = self.ledger.key(payment.key_hash)
            assert state is not None
            if state.reserved_msat:
                raise RuntimeError("close_xcashu before the request was settled")
            change_units = state.available_msat // per_unit
            if payment.offline:  # from the pool; what it cannot cover stays on the key
                change, change_units = self._from_pool(tx, request_id, payment, change_units)
            else:
                change = self.wallet.cut_in(tx, request_id, payment.mint, payment.unit,
                                            change_units)
            if change_units:
                self.ledger.debit_in(tx, payment.key_hash, change_units * per_unit,
                                     "x-cashu change", request_id, kind="change")
            rounding = state.available_msat % per_unit
            if rounding:
                self.ledger.debit_in(tx, payment.key_hash, rounding, "rounding to the unit",
                                     request_id, kind="charge")
            self.ledger.payments.set_change(tx, payment.token_hash, change,
                                            change_units * per_unit)
        payment.change, payment.change_msat, payment.closed = (change, change_units * per_unit,
                                                               True)
        return payment
