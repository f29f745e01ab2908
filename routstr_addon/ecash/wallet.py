"""The proxy's Cashu wallet: one ``MintWallet`` per trusted mint, proofs kept in the ledger.

Proofs live in the ledger's database (table ``proofs``), not in a wallet file of their own, so
that receiving a token and crediting it are one transaction, and several proxy processes on one
PostgreSQL database share one wallet. nutshell provides the models and the blind-signature
crypto; the mint is spoken to through ``MintClient``.

Redeeming swaps the incoming proofs for new ones (NUT-03), net of the mint's input fee (NUT-02).
The new proofs can be cut to order: for an x-cashu request the swap makes outputs from which
any change between "all of it" and "all but the maximum cost" is a subset, so the change is
handed back later without a second mint round trip.

Secrets and blinding factors are derived from the wallet's seed (NUT-13, ``seed.py``) and a
counter per keyset reserved in the ledger before the outputs go to the mint, so the wallet's
proofs can be found again from the mnemonic alone (``Wallet.restore``, NUT-09).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from routstr_addon.ecash.mint import SPENT_CODE, MintClient, MintError, MintUnreachable
from routstr_addon.ecash.p2pk import MintKeys, MintKeyset, PaymentKey, supports_locked_payments
from routstr_addon.ecash.seed import Seed, load_or_create_mnemonic, seed_from_mnemonic
from routstr_addon.ecash.tokens import (
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
from routstr_addon.ledger import Ledger, ProofRecord, Tx
from routstr_addon.netguard import NetPolicy

if TYPE_CHECKING:
    from collections.abc import Callable

    from cashu.core.base import Proof

    from routstr_addon.ledger.counters import KeysetCounters
    from routstr_addon.settings import Config

__all__ = ["Melted", "MintWallet", "Redeemed", "Wallet", "WalletError", "proof_of", "record_of"]

logger = logging.getLogger(__name__)

OUTPUTS_SIGNED_CODE = 11003  # "outputs already signed": a secret was used before
RESTORE_BATCH = 100  # outputs per NUT-09 request
RESTORE_GAP = 3  # consecutive empty batches that end a keyset's walk
CHECK_BATCH = 100  # Ys per NUT-07 request


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


@dataclass(slots=True)
class Melted:
    """The outcome of a melt: PAID, UNPAID (nothing left the pool) or PENDING (unknown)."""

    state: str
    amount: int  # paid to the invoice, in the unit
    fee_reserve: int
    fee_paid: int  # what left the pool beyond ``amount``: Lightning and input fees
    change: int


class MintWallet:
    """What the proxy knows of one mint: its keysets and keys, and a client to reach it."""

    def __init__(self, url: str, timeout: float = 15.0, seed: Seed | None = None,
                 counters: KeysetCounters | None = None, net: NetPolicy | None = None) -> None:
        """``net``: the rules for a mint a user named (its tokens' mint), not a trusted one."""
        self.url = sanitize_mint_url(url)
        self.client = MintClient(self.url, timeout, net.mounts() if net is not None else None)
        self.keysets: dict[str, Keyset] = {}
        self.info: dict[str, Any] | None = None  # NUT-06, fetched with the keysets
        self._offline: tuple[dict[str, Keyset], MintKeys] | None = None
        self._loading = asyncio.Lock()
        # Deterministic secrets need both; without them (throwaway helpers) they are random.
        self.seed = seed if counters is not None else None
        self.counters = counters

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
            if self.info is None:
                try:
                    self.info = await self.client.info()
                except (MintError, MintUnreachable) as e:
                    logger.warning("mint %s: no info (%s)", self.url, e)
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

    @property
    def takes_locked(self) -> bool:
        """Whether the mint advertises NUT-10/11/12: locks it enforces, DLEQ proofs it signs."""
        return self.info is not None and supports_locked_payments(self.info)

    def offline_keys(self) -> MintKeys:
        """The keysets as the offline checks want them, decoded once per set of keysets."""
        cached = self._offline
        if cached is None or cached[0] is not self.keysets:
            cached = self._offline = (self.keysets, MintKeys(
                self.url, [MintKeyset.from_keyset(k) for k in self.keysets.values()]))
        return cached[1]

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
        """Blinded outputs for ``amounts``: secrets derived from the seed and counters reserved
        (durably, before anything reaches the mint) for this keyset; random without a seed."""
        if self.seed is None or self.counters is None or not amounts:
            return self._blind_random(amounts, keyset)
        start = self.counters.reserve(keyset.id, len(amounts))
        return self.derived_outputs(keyset.id, start, amounts)

    def derived_outputs(self, keyset_id: str, start: int, amounts: Sequence[int]) -> tuple[
            list[dict[str, Any]], list[str], list[Any]]:
        """The outputs of counters ``start``, ``start + 1``… of a keyset (no reservation)."""
        from cashu.core.crypto.b_dhke import step1_alice
        from cashu.core.crypto.secp import PrivateKey

        assert self.seed is not None
        outputs, secret_list, rs = [], [], []
        for i, amount in enumerate(amounts):
            secret, r_bytes = self.seed.derive(keyset_id, start + i)
            b_, r = step1_alice(secret, PrivateKey(r_bytes))
            outputs.append({"amount": amount, "id": keyset_id, "B_": b_.format().hex()})
            secret_list.append(secret)
            rs.append(r)
        return outputs, secret_list, rs

    def _blind_random(self, amounts: Sequence[int], keyset: Keyset) -> tuple[
            list[dict[str, Any]], list[str], list[Any]]:
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
                secret_list: Sequence[str], rs: Sequence[Any],
                blank: bool = False) -> list[Proof]:
        """Proofs from the mint's blind signatures, checking their DLEQ proofs (NUT-12).

        ``blank``: the outputs were NUT-08 blank outputs (a melt's change): the mint signs the
        first few of them with amounts of its choosing."""
        from cashu.core.base import DLEQWallet, Proof
        from cashu.core.crypto.b_dhke import alice_verify_dleq, step3_alice
        from cashu.core.crypto.secp import PrivateKey, PublicKey

        if len(signatures) > len(outputs) or (not blank and len(signatures) != len(outputs)):
            raise WalletError("the mint returned a different number of signatures")
        proofs = []
        for sig, out, secret, r in zip(signatures, outputs, secret_list, rs, strict=False):
            keyset = self.keysets.get(sig["id"])
            if keyset is None or sig["amount"] not in keyset.keys or (
                    not blank and sig["amount"] != out["amount"]):
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

    async def swap(self, inputs: Sequence[Proof], amounts: Sequence[int], unit: str,
                   lost: Any = None) -> list[Proof]:
        """Exchange ``inputs`` for new proofs of ``amounts`` (which must add up to the inputs
        less the fee). ``lost(outputs_json)`` is called if the mint may have swapped but its
        answer did not arrive, with what it takes to ask for the signatures again."""
        keyset = self.active(unit)
        outputs, secret_list, rs = self.blind(amounts, keyset)
        try:
            signatures = await self.client.swap([proof_to_dict(p) for p in inputs], outputs)
        except MintUnreachable as e:
            if e.sent and lost is not None:
                lost(json.dumps({"outputs": outputs, "secrets": secret_list,
                                 "rs": [r.to_hex() for r in rs]}))
            raise
        except MintError as e:
            if e.code == OUTPUTS_SIGNED_CODE:
                logger.error("the mint %s has signed these outputs before: the wallet's "
                             "derivation counters are behind (database lost or restored from "
                             "a backup?). Run `routstr wallet restore`.", self.url)
            raise
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

    def __init__(self, ledger: Ledger, mint_urls: Sequence[str], timeout: float = 15.0,
                 seed: bytes | None = None) -> None:
        """``seed``: the BIP39 seed secrets are derived from (NUT-13); without it they are
        random and the wallet cannot be restored."""
        if not mint_urls:
            raise ValueError("at least one mint is needed")
        self.ledger = ledger
        self.seed = Seed(seed) if seed is not None else None
        # What NUT-18 requests ask payers to lock to (restored with the mnemonic).
        self.payment_key = PaymentKey.from_seed(seed) if seed is not None else None
        self.counters = ledger.counters if seed is not None else None
        self.mints = {w.url: w for w in (MintWallet(u, timeout, self.seed, self.counters)
                                         for u in mint_urls)}
        self.primary = next(iter(self.mints.values()))
        self.timeout = timeout
        self.foreign: dict[str, MintWallet] = {}  # untrusted mints met in tokens, to melt at
        # How untrusted mints are reached: the URL is the user's (their token names it).
        self.stranger_net = NetPolicy()
        self._spending = asyncio.Lock()  # picking pool proofs for refunds is one at a time

    @classmethod
    def from_config(cls, ledger: Ledger, config: Config, timeout: float | None = None) -> Wallet:
        """The wallet of ``CASHU_MINTS``, with the seed of ``WALLET_MNEMONIC`` or of the data
        folder's mnemonic file (made on first use). Raises MnemonicError for a bad file."""
        seed = seed_from_mnemonic(load_or_create_mnemonic(config))
        wallet = cls(ledger, config.cashu_mints, timeout or float(config.mint_timeout), seed=seed)
        wallet.stranger_net = NetPolicy(config.allow_private_ln_addresses,
                                        config.nostr.tor_proxy_url)
        return wallet

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
            found = self.foreign[url] = MintWallet(url, self.timeout, net=self.stranger_net)
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
        recovered = await self._recover(mint, token)
        if recovered is not None:
            return Redeemed(mint.url, token.unit, net, fee, recovered)
        amounts = (amounts_for(net) if keep_variable is None
                   else change_friendly_amounts(net, keep_variable))

        def lost(outputs_json: str) -> None:
            self.ledger.proofs.save_lost_swap(token.hash, mint.url, token.unit, net, fee,
                                              outputs_json)

        try:
            proofs = await mint.swap(token.proofs, amounts, token.unit, lost)
        except MintError as e:
            if e.code == SPENT_CODE or "spent" in e.detail.lower():
                raise TokenError("This token has already been spent.",
                                 code="token_already_spent") from None
            if e.code == OUTPUTS_SIGNED_CODE:  # our outputs, not the user's token
                raise WalletError(f"the mint refused this wallet's outputs: {e.detail}") from None
            raise TokenError(f"The mint refused the token: {e.detail}") from None
        return Redeemed(mint.url, token.unit, net, fee, proofs)

    async def _recover(self, mint: MintWallet, token: IncomingToken) -> list[Proof] | None:
        """The new proofs of an earlier swap of this token whose answer was lost, if the mint
        did it (NUT-09 restore of its outputs); None if there was none or it never happened."""
        from cashu.core.crypto.secp import PrivateKey

        pending = self.ledger.proofs.lost_swap(token.hash)
        if pending is None:
            return None
        saved = json.loads(pending)
        outputs = saved["outputs"]
        signed, signatures = await mint.client.restore(outputs)
        proofs = None
        if signatures and len(signatures) == len(outputs):
            by_b = {o["B_"]: s for o, s in zip(signed, signatures, strict=True)}
            ordered = [by_b[o["B_"]] for o in outputs if o["B_"] in by_b]
            if len(ordered) == len(outputs):
                proofs = mint.unblind(ordered, outputs, saved["secrets"],
                                      [PrivateKey(bytes.fromhex(r)) for r in saved["rs"]])
                logger.info("recovered the lost swap of a token of %d %s", token.amount,
                            token.unit)
        self.ledger.proofs.forget_lost_swap(token.hash)
        return proofs

    # -- the pool ----------------------------------------------------------------------------

    def store_in(self, tx: Tx, mint: str, unit: str, proofs: Sequence[Proof], state: str,
                 owner: str | None = None) -> None:
        """Record proofs inside a ledger transaction (with what they fund, if anything)."""
        self.ledger.proofs.add(tx, mint, unit, [_record(p) for p in proofs], state, owner)

    def owned_in(self, tx: Tx, owner: str) -> list[Proof]:
        return [_proof(r) for r in self.ledger.proofs.owned(tx, owner)]

    def set_state_in(self, tx: Tx, proofs: Sequence[Proof], state: str,
                     owner: str | None) -> None:
        self.ledger.proofs.set_state(tx, [p.secret for p in proofs], state, owner)

    def cut_in(self, tx: Tx, owner: str, mint: str, unit: str, amount: int) -> str | None:
        """Hand back ``amount`` (in the unit) of the proofs ``owner`` holds, as a token;
        the rest join the pool. No mint call: the proofs were shaped for this when redeemed.
        Returns None for nothing to hand back. Raises WalletError if no exact subset exists."""
        held = self.owned_in(tx, owner)
        token = None
        if amount > 0:
            chosen = pick_exact([p.amount for p in held], amount)
            if chosen is None:
                raise WalletError(f"no exact change of {amount} {unit} in the held proofs")
            picked = [held[i] for i in chosen]
            token = serialize_token(mint, unit, picked)
            self.set_state_in(tx, picked, "sent", owner)
            keep = [p for i, p in enumerate(held) if i not in set(chosen)]
        else:
            keep = held
        self.set_state_in(tx, keep, "unspent", None)
        return token

    def cut_part_in(self, tx: Tx, owner: str, mint: str, unit: str, amount: int) -> str:
        """Hand back ``amount`` of the proofs ``owner`` holds now, keeping the rest held for
        the change still to come (``cut_in``). Raises WalletError without an exact subset."""
        held = self.owned_in(tx, owner)
        chosen = pick_exact([p.amount for p in held], amount)
        if chosen is None:
            raise WalletError(f"no exact change of {amount} {unit} in the held proofs")
        picked = [held[i] for i in chosen]
        self.set_state_in(tx, picked, "sent", owner)
        return serialize_token(mint, unit, picked)

    def balances(self) -> dict[tuple[str, str], int]:
        """What the proxy holds per (mint, unit), in the unit: proofs not handed out or spent."""
        return self.ledger.proofs.balances()

    async def send(self, mint_url: str, unit: str, amount: int, owner: str,
                   record: Callable[[Tx, str, int], None] | None = None) -> tuple[str, int]:
        """A token of ``amount`` (in the unit) from the pool: exact proofs if the pool has
        them, else a swap that splits off the amount. The swap's input fee is taken from the
        amount. Returns (token, fee).

        Proofs are claimed for ``owner`` with conditional updates, so two processes (or the
        proxy and the CLI) never hand out the same proof; on any failure before the mint may
        have acted, the claimed proofs go back to the pool. ``record(tx, token, fee)`` writes
        what the token is for in the same transaction that marks its proofs sent."""
        mint = self.mints[mint_url]
        await mint.ensure_loaded()
        keyset = mint.active(unit)  # before claiming anything
        async with self._spending:
            inputs, exact = self._claim(mint, unit, amount, owner)
            if exact:
                token = serialize_token(mint.url, unit, inputs)
                with self.ledger.transaction() as tx:
                    self.set_state_in(tx, inputs, "sent", owner)
                    if record is not None:
                        record(tx, token, 0)
                return token, 0
            total = sum(p.amount for p in inputs)
            fee = mint.input_fee(inputs)
            send_amount = amount - fee
            amounts = amounts_for(send_amount) + amounts_for(total - fee - send_amount)
            with self._unclaimed_on_failure(inputs, owner):
                if send_amount <= 0:
                    raise WalletError(f"{amount} {unit} does not cover the mint's fee of {fee}")
                fresh = await mint.swap(inputs, amounts, keyset.unit)
            send_part = fresh[: len(amounts_for(send_amount))]
            keep_part = fresh[len(send_part):]
            token = serialize_token(mint.url, unit, send_part)
            with self.ledger.transaction() as tx:
                self.set_state_in(tx, inputs, "spent", owner)
                self.store_in(tx, mint.url, unit, send_part, "sent", owner)
                self.store_in(tx, mint.url, unit, keep_part, "unspent")
                if record is not None:
                    record(tx, token, fee)
            return token, fee

    async def reshape(self, mint_url: str, unit: str, wanted: Sequence[int], above: int,
                      owner: str) -> int:
        """Swap pool proofs larger than ``above`` into ``wanted`` amounts (as many as they
        cover after the fee) and the rest in powers of two: the change pool's refill. Returns
        the amount of the wanted proofs made."""
        mint = self.mints[mint_url]
        await mint.ensure_loaded()
        keyset = mint.active(unit)
        target = sum(wanted)
        async with self._spending:
            for _ in range(5):
                try:
                    with self.ledger.transaction() as tx:
                        pool = [_proof(r) for r in self.ledger.proofs.pool(tx, mint.url, unit)
                                if r.amount > above]
                        inputs: list[Proof] = []
                        for p in pool:  # largest first
                            if sum(i.amount for i in inputs) >= target + mint.input_fee(inputs):
                                break
                            inputs.append(p)
                        if not inputs:
                            return 0
                        if not self.ledger.proofs.claim(tx, [p.secret for p in inputs], owner):
                            raise _Contended
                    break
                except _Contended:
                    continue
            else:
                raise WalletError("the wallet's proofs are busy; try again")
        net = sum(p.amount for p in inputs) - mint.input_fee(inputs)
        fitting: list[int] = []
        for a in wanted:
            if sum(fitting) + a <= net:
                fitting.append(a)
        amounts = fitting + amounts_for(net - sum(fitting))
        with self._unclaimed_on_failure(inputs, owner):
            fresh = await mint.swap(inputs, amounts, keyset.unit)
        with self.ledger.transaction() as tx:
            self.set_state_in(tx, inputs, "spent", owner)
            self.store_in(tx, mint.url, unit, fresh, "unspent")
        return sum(fitting)

    async def melt(self, mint_url: str, unit: str, quote: dict[str, Any], owner: str,
                   on_claimed: Any = None) -> Melted:
        """Pay a melt quote (NUT-05) with pool proofs, getting the unused fee back as change
        (NUT-08). ``on_claimed(outputs_json)`` runs once proofs are claimed and before the mint
        is asked, so the caller can record the change outputs for recovery.

        The claimed proofs stay ``reserved`` for ``owner`` while the outcome is unknown
        (``state`` PENDING, or the mint not answering after it may have acted): ``finish_melt``
        settles them from the quote's state later."""
        mint = self.mints[mint_url]
        await mint.ensure_loaded()
        keyset = mint.active(unit)
        need = int(quote["amount"]) + int(quote.get("fee_reserve") or 0)
        target = need
        async with self._spending:
            for _ in range(3):
                inputs, _ = self._claim(mint, unit, target, owner)
                if sum(p.amount for p in inputs) >= need + mint.input_fee(inputs):
                    break
                self._unclaim(inputs, owner)
                target = need + mint.input_fee(inputs)
            else:
                raise WalletError("the pool cannot cover this payment and its fees")
        over = sum(p.amount for p in inputs) - mint.input_fee(inputs) - int(quote["amount"])
        count = max(1, over.bit_length()) if over > 0 else 0
        start = self.counters.reserve(keyset.id, count) if count and self.counters else None
        blank = {"keyset": keyset.id, "start": start, "count": count} if start is not None \
            else None
        if on_claimed is not None:
            on_claimed(json.dumps(blank) if blank else None)
        outputs = (mint.derived_outputs(keyset.id, start, [1] * count)[0]
                   if start is not None else [])
        with self._unclaimed_on_failure(inputs, owner):
            answer = await mint.client.melt(quote["quote"], [proof_to_dict(p) for p in inputs],
                                            outputs or None)
        return self._melt_outcome(mint, unit, owner, inputs, answer, blank)

    async def finish_melt(self, mint_url: str, unit: str, quote_id: str, owner: str,
                          blank_json: str | None) -> Melted:
        """Settle a melt whose outcome was not known, from the mint's quote state."""
        mint = self.mints[mint_url]
        await mint.ensure_loaded()
        answer = await mint.client.melt_quote_state(quote_id)
        inputs = [_proof(r) for r in self.ledger.proofs.reserved_for(owner)]
        blank = json.loads(blank_json) if blank_json else None
        return self._melt_outcome(mint, unit, owner, inputs, answer, blank)

    def _melt_outcome(self, mint: MintWallet, unit: str, owner: str, inputs: Sequence[Proof],
                      answer: dict[str, Any], blank: dict[str, Any] | None) -> Melted:
        state = str(answer.get("state", "")).upper()
        fee_reserve = int(answer.get("fee_reserve") or 0)
        if state == "UNPAID":  # it failed: the proofs are still ours
            self._unclaim(inputs, owner)
            return Melted(state, int(answer.get("amount") or 0), fee_reserve, 0, 0)
        if state != "PAID":
            return Melted(state or "PENDING", int(answer.get("amount") or 0), fee_reserve, 0, 0)
        change: list[Proof] = []
        signatures = answer.get("change") or []
        if signatures and blank:
            outputs, secret_list, rs = mint.derived_outputs(blank["keyset"], blank["start"],
                                                            [1] * blank["count"])
            change = mint.unblind(signatures, outputs, secret_list, rs, blank=True)
        spent = sum(p.amount for p in inputs)
        back = sum(p.amount for p in change)
        with self.ledger.transaction() as tx:
            self.set_state_in(tx, inputs, "spent", owner)
            self.store_in(tx, mint.url, unit, change, "unspent")
        amount = int(answer.get("amount") or 0)
        return Melted("PAID", amount, fee_reserve, spent - back - amount, back)

    def _claim(self, mint: MintWallet, unit: str, amount: int,
               owner: str) -> tuple[list[Proof], bool]:
        """Pick pool proofs for ``amount`` and mark them reserved for ``owner``; retried if
        another process claimed one of them first."""
        for _ in range(5):
            try:
                with self.ledger.transaction() as tx:
                    return self._pick_in(tx, mint, unit, amount, owner)
            except _Contended:
                continue
        raise WalletError("the wallet's proofs are busy; try again")

    def _pick_in(self, tx: Tx, mint: MintWallet, unit: str, amount: int,
                 owner: str) -> tuple[list[Proof], bool]:
        pool = [_proof(r) for r in self.ledger.proofs.pool(tx, mint.url, unit)]
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
        if not self.ledger.proofs.claim(tx, [p.secret for p in picked], owner):
            raise _Contended  # rolls the whole claim back
        return picked, exact

    @contextlib.contextmanager
    def _unclaimed_on_failure(self, inputs: Sequence[Proof], owner: str) -> Iterator[None]:
        """Around a mint call spending claimed ``inputs``: when it fails before the mint could
        act, the proofs go back to the pool; when it may have been sent, they stay reserved for
        ``owner`` so the outcome can be recovered."""
        try:
            yield
        except MintUnreachable as e:
            if not e.sent:
                self._unclaim(inputs, owner)
            raise
        except BaseException:
            self._unclaim(inputs, owner)
            raise

    def _unclaim(self, proofs: Sequence[Proof], owner: str) -> None:
        """Give claimed proofs back to the pool, only those still reserved for ``owner``."""
        self.ledger.proofs.unclaim([p.secret for p in proofs], owner)

    # -- restore (NUT-09) ------------------------------------------------------------------

    async def restore(self, progress: Callable[[str], None] | None = None, *,
                      batch: int = RESTORE_BATCH, gap: int = RESTORE_GAP) -> dict[str, Any]:
        """Find the wallet's proofs again from its seed alone, at every trusted mint.

        For each keyset in sat or msat, the outputs of counters 0, 1, 2… are derived again
        and the mint asked to sign them again (NUT-09), ``batch`` at a time, until ``gap``
        batches in a row find nothing (and never before the keyset's stored counter). The
        proofs found that the mint says are unspent (NUT-07) and the ``proofs`` table lacks are
        added to the pool; the table's ``unspent`` proofs the mint says are spent are marked
        spent; each keyset's counter is moved past the last output found. Proofs whose counters
        were reserved while this ran are left to the process that made them.

        Change and refunds handed to users and not yet redeemed are unspent too: a restore
        into an empty table counts them as the wallet's own.

        Returns ``{"mints": [per mint and unit: found, restored, known, pending, marked_spent
        …], "restored_msat", "errors"}``.
        """
        if self.seed is None or self.counters is None:
            raise WalletError("this wallet has no seed to restore from")
        say = progress or (lambda _text: None)
        result: list[dict[str, Any]] = []
        errors: list[str] = []
        for mint in self.mints.values():
            try:
                result.extend(await self._restore_mint(mint, say, batch, gap))
            except (MintError, MintUnreachable, WalletError) as e:
                errors.append(f"{mint.url}: {e}")
                logger.warning("restore at %s failed: %s", mint.url, e)
        return {"mints": result, "restored_msat": sum(m["restored_msat"] for m in result),
                "errors": errors}

    async def _restore_mint(self, mint: MintWallet, say: Callable[[str], None], batch: int,
                            gap: int) -> list[dict[str, Any]]:
        nutshell()
        from cashu.core.crypto.b_dhke import hash_to_curve

        assert self.counters is not None
        say(f"loading the keysets of {mint.url}…")
        await mint.load()
        entries: dict[str, dict[str, Any]] = {}

        def entry(unit: str) -> dict[str, Any]:
            return entries.setdefault(unit, {
                "mint": mint.url, "unit": unit, "found": 0, "found_proofs": 0,
                "restored": 0, "restored_proofs": 0, "known": 0, "known_proofs": 0,
                "spent": 0, "pending": 0, "skipped": 0, "marked_spent": 0,
                "marked_spent_proofs": 0, "restored_msat": 0, "keysets": {}})

        found: list[tuple[Keyset, Proof]] = []
        for keyset in sorted(mint.keysets.values(), key=lambda k: (k.unit, not k.active, k.id)):
            proofs, skipped, next_counter = await self._walk_keyset(mint, keyset, say, batch,
                                                                    gap)
            e = entry(keyset.unit)
            e["keysets"][keyset.id] = next_counter
            e["skipped"] += skipped
            e["found"] += sum(p.amount for p in proofs)
            e["found_proofs"] += len(proofs)
            found.extend((keyset, p) for p in proofs)

        pool = self.ledger.proofs.unspent_at(mint.url)
        # Outputs of Lightning invoices being minted: the invoice stores them when it credits.
        minting = {s for saved in self.ledger.invoices.minting_outputs(mint.url)
                   for s in json.loads(saved)["secrets"]}
        secrets_to_check = list(dict.fromkeys([p.secret for _, p in found]
                                              + [s for s, _, _ in pool]))
        states: dict[str, str] = {}
        for start in range(0, len(secrets_to_check), CHECK_BATCH):
            chunk = secrets_to_check[start:start + CHECK_BATCH]
            say(f"asking {mint.url} about proofs {start + 1}–{start + len(chunk)} of "
                f"{len(secrets_to_check)}…")
            ys = {hash_to_curve(s.encode()).format().hex(): s for s in chunk}
            for answer in await mint.client.check_state(list(ys)):
                secret = ys.get(str(answer.get("Y")))
                if secret is not None:
                    states[secret] = str(answer.get("state"))

        with self.ledger.transaction(durable=True) as tx:
            for keyset, p in found:
                e = entry(keyset.unit)
                state = states.get(p.secret)
                if state == "SPENT":
                    e["spent"] += p.amount
                    continue
                if state != "UNSPENT":  # pending at the mint, or not answered
                    e["pending"] += p.amount
                    continue
                if p.secret in minting:
                    e["skipped"] += p.amount
                    continue
                if self.ledger.proofs.add_found(tx, mint.url, keyset.unit, _record(p)):
                    e["restored"] += p.amount
                    e["restored_proofs"] += 1
                else:
                    e["known"] += p.amount
                    e["known_proofs"] += 1
            for secret, unit, amount in pool:
                if states.get(secret) == "SPENT" and self.ledger.proofs.mark_spent(tx, secret):
                    e = entry(unit)
                    e["marked_spent"] += amount
                    e["marked_spent_proofs"] += 1
        for e in entries.values():
            e["restored_msat"] = e["restored"] * UNIT_MSAT.get(e["unit"], 0)
        return list(entries.values())

    async def _walk_keyset(self, mint: MintWallet, keyset: Keyset, say: Callable[[str], None],
                           batch: int, gap: int) -> tuple[list[Proof], int, int]:
        """The proofs the mint signs again for a keyset's counters, the amount of those left
        to a live process, and the keyset's next counter afterwards (moved past the last one
        found)."""
        assert self.counters is not None
        stored = self.counters.current(keyset.id)
        found: list[tuple[int, Proof]] = []
        counter, empty, highest = 0, 0, -1
        while empty < gap or counter < stored:
            say(f"{mint.url}, keyset {keyset.id[:16]}… ({keyset.unit}): outputs "
                f"{counter}–{counter + batch - 1}, {len(found)} proof(s) found so far…")
            # Any amount will do: the mint answers with the amount it signed (as nutshell does).
            outputs, secret_list, rs = mint.derived_outputs(keyset.id, counter, [1] * batch)
            answered, signatures = await mint.client.restore(outputs)
            if not signatures:
                empty += 1
                counter += batch
                continue
            empty = 0
            index = {o["B_"]: i for i, o in enumerate(outputs)}
            picked = []
            for out, sig in zip(answered, signatures, strict=True):
                i = index.get(out.get("B_", ""))
                if i is None or sig.get("id") != keyset.id:
                    raise WalletError("the mint restored an output that was not asked for")
                picked.append(i)
            proofs = mint.unblind(signatures,
                                  [{**outputs[i], "amount": sig["amount"]}
                                   for i, sig in zip(picked, signatures, strict=True)],
                                  [secret_list[i] for i in picked], [rs[i] for i in picked])
            found.extend((counter + i, p) for i, p in zip(picked, proofs, strict=True))
            highest = max(highest, counter + max(picked))
            counter += batch
        # Counters reserved by others while this ran (from the stored value at the start to
        # the one now) belong to live operations, which store their proofs themselves.
        live = range(stored, self.counters.current(keyset.id))
        kept = [p for c, p in found if c not in live]
        skipped = sum(p.amount for c, p in found if c in live)
        if highest >= 0:
            self.counters.advance(keyset.id, highest + 1)
        return kept, skipped, self.counters.current(keyset.id)


class _Contended(Exception):
    """Another process claimed a proof between our read and our update."""


def _proof(record: ProofRecord) -> Proof:
    from cashu.core.base import DLEQWallet, Proof

    return Proof(id=record.keyset_id, amount=record.amount, secret=record.secret, C=record.c,
                 dleq=DLEQWallet(**json.loads(record.dleq)) if record.dleq else None)


def _record(proof: Proof) -> ProofRecord:
    dleq = json.dumps(proof.dleq.model_dump()) if proof.dleq is not None else None
    return ProofRecord(proof.secret, proof.id, proof.amount, proof.C, dleq)


# Public names for the conversions, for the other payment modules (and the benchmarks).
proof_of = _proof
record_of = _record
