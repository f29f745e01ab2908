"""Locked payments checked offline (``routstr_addon/ecash/p2pk.py``).

Proofs are minted at a real nutshell mint with the secrets each case needs (locked right,
locked wrong, malformed), then refused or accepted; the crypto is compared with nutshell's own
(``carol_verify_dleq``, ``hash_to_curve``, the mint's spending conditions); witnesses are
spent at the mint; cashu-ts and nutshell's ``cashu pay`` pay a NUT-18 request locked to the
proxy's key, and what they send passes the checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ecash.mint import MintError
from routstr_addon.ecash.p2pk import (
    PAYMENT_KEY_PATH,
    LockPolicy,
    LockRefused,
    MintKeys,
    MintKeyset,
    PaymentKey,
    Refusal,
    check_lock,
    hash_to_curve,
    looks_locked,
    parse_lock,
    sign_witnesses,
    supports_locked_payments,
    verify_dleq,
    verify_payment,
    y_hex,
)
from routstr_addon.ecash.tokens import (
    IncomingToken,
    TokenError,
    nutshell,
    parse_token,
    serialize_token,
)
from routstr_addon.ecash.wallet import MintWallet

from .cashu_ts import CashuTs
from .conftest import BIN
from .ecash_user import UserWallet

nutshell()
from cashu.core.base import DLEQWallet, NUT10Option, PaymentRequest, Proof  # noqa: E402
from cashu.core.crypto import b_dhke  # noqa: E402
from cashu.core.crypto.secp import PrivateKey as NutshellPrivateKey  # noqa: E402
from cashu.core.crypto.secp import PublicKey as NutshellPublicKey  # noqa: E402
from cashu.core.nuts import nut18  # noqa: E402

MNEMONIC = ("abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon "
            "abandon about")
KEY = PaymentKey.from_mnemonic(MNEMONIC)
OTHER_PRIVATE = bytes.fromhex("07" * 32)
OTHER = PaymentKey(OTHER_PRIVATE)


def key_private() -> bytes:
    """KEY's private key, derived here independently of PaymentKey."""
    from bip32 import BIP32

    from routstr_addon.ecash.seed import seed_from_mnemonic

    return bytes(BIP32.from_seed(seed_from_mnemonic(MNEMONIC)).get_privkey_from_path(
        "m/1381192786'/0'/0'"))


def witness_by(private: bytes, secret: str) -> str:
    """A NUT-11 witness made with nutshell's own Schnorr signing, whatever the secret."""
    from cashu.core.p2pk import schnorr_sign

    signature = schnorr_sign(secret.encode(), NutshellPrivateKey(private)).hex()
    return json.dumps({"signatures": [signature]})
POLICY = LockPolicy(KEY.public_hex)
DAY = 86400


def p2pk(data: str = KEY.public_hex, tags: Sequence[Sequence[str]] | None = (),
         kind: str = "P2PK", compact: bool = True) -> str:
    """A NUT-10 secret; ``tags=None`` leaves the field out."""
    payload: dict[str, Any] = {"nonce": secrets.token_hex(16), "data": data}
    if tags is not None:
        payload["tags"] = [list(t) for t in tags]
    return json.dumps([kind, payload], separators=(",", ":") if compact else None)


def refused(reason: Refusal, call: Any, *args: Any, **kwargs: Any) -> LockRefused:
    with pytest.raises(LockRefused) as caught:
        call(*args, **kwargs)
    assert caught.value.reason is reason, str(caught.value)
    assert caught.value.code == reason.value
    return caught.value


# --- minting proofs with chosen secrets at the real mint ------------------------------------


async def _mint_secrets(url: str, wanted: Sequence[tuple[str, int]]) -> list[Proof]:
    from cashu.core.crypto.b_dhke import step1_alice

    wallet = MintWallet(url)
    try:
        await wallet.load()
        quote = await wallet.client.mint_quote(sum(a for _, a in wanted), "sat")
        for _ in range(200):
            if (await wallet.client.mint_quote_state(quote["quote"]))["state"] == "PAID":
                break
            await asyncio.sleep(0.05)
        keyset = wallet.active("sat")
        outputs, rs = [], []
        for secret, amount in wanted:
            b_, r = step1_alice(secret)
            outputs.append({"amount": amount, "id": keyset.id, "B_": b_.format().hex()})
            rs.append(r)
        signatures = await wallet.client.mint(quote["quote"], outputs)
        return wallet.unblind(signatures, outputs, [s for s, _ in wanted], rs)
    finally:
        await wallet.client.aclose()


def mint_secrets(url: str, wanted: Sequence[tuple[str, int]]) -> list[Proof]:
    return asyncio.run(_mint_secrets(url, wanted))


def mint_keys(url: str) -> MintKeys:
    listed = httpx.get(f"{url}/v1/keysets", timeout=10).json()["keysets"]
    keysets = []
    for info in listed:
        keys = httpx.get(f"{url}/v1/keys/{info['id']}", timeout=10).json()["keysets"][0]["keys"]
        keysets.append(MintKeyset.from_api(info, keys))
    return MintKeys(url, keysets)


def token(url: str, proofs: Sequence[Proof], unit: str = "sat") -> IncomingToken:
    """A token as the request path gets it: cashuB, with the DLEQ proofs, parsed."""
    return parse_token(serialize_token(url, unit, proofs))


def raw_token(url: str, proofs: Sequence[Proof], unit: str = "sat") -> IncomingToken:
    """A token built around proofs parse_token would not let through (duplicates)."""
    return IncomingToken("cashuB-test", url, unit, list(proofs))


def now() -> float:
    return time.time()


LOCKED = {  # name -> (secret, amount): minted once for the module
    "good_1": (p2pk(), 1),
    "good_2": (p2pk(), 2),
    "good_4": (p2pk(), 4),
    "good_8": (p2pk(), 8),
    "good_16": (p2pk(), 16),
    "good_32": (p2pk(), 32),
    "good_64": (p2pk(), 64),
    "good_128": (p2pk(), 128),
    "sigflag_inputs": (p2pk(tags=[["sigflag", "SIG_INPUTS"]], compact=False), 2),
    "no_tags_field": (p2pk(tags=None), 1),
    "n_sigs_1": (p2pk(tags=[["n_sigs", "1"]]), 1),
    "locktime_far": (p2pk(tags=[["locktime", str(int(time.time()) + 2 * DAY)]]), 4),
    "swap_a": (p2pk(), 8),
    "swap_b": (p2pk(tags=[["sigflag", "SIG_INPUTS"]]), 4),
    "plain": (secrets.token_hex(32), 1),
    "wrong_key": (p2pk(data=OTHER.public_hex), 1),
    "pubkeys": (p2pk(tags=[["pubkeys", OTHER.public_hex]]), 1),
    "refund": (p2pk(tags=[["locktime", str(int(time.time()) + 2 * DAY)],
                          ["refund", OTHER.public_hex]]), 1),
    "n_sigs_2": (p2pk(tags=[["pubkeys", OTHER.public_hex], ["n_sigs", "2"]]), 1),
    "n_sigs_alone": (p2pk(tags=[["n_sigs", "2"]]), 1),
    "sig_all": (p2pk(tags=[["sigflag", "SIG_ALL"]]), 1),
    "unknown_tag": (p2pk(tags=[["expiry", "1"]]), 1),
    "locktime_soon": (p2pk(tags=[["locktime", str(int(time.time()) + 60)]]), 1),
    "locktime_past": (p2pk(tags=[["locktime", str(int(time.time()) - 60)]]), 1),
    "htlc": (p2pk(data="ab" * 32, kind="HTLC"), 1),
    "duplicate_key": ('["P2PK",{"nonce":"' + secrets.token_hex(16) + '","data":"'
                      + OTHER.public_hex + '","data":"' + KEY.public_hex + '"}]', 1),
    "long_secret": (json.dumps(["P2PK", {"nonce": "n" * 600, "data": KEY.public_hex}]), 1),
}
REFUSALS = {
    "plain": Refusal.NOT_LOCKED,
    "wrong_key": Refusal.WRONG_KEY,
    "pubkeys": Refusal.EXTRA_PUBKEYS,
    "refund": Refusal.REFUND_PATH,
    "n_sigs_2": Refusal.EXTRA_PUBKEYS,
    "n_sigs_alone": Refusal.MULTISIG,
    "sig_all": Refusal.SIG_ALL,
    "unknown_tag": Refusal.UNSUPPORTED_TAG,
    "locktime_soon": Refusal.LOCKTIME_TOO_SOON,
    "locktime_past": Refusal.LOCKTIME_TOO_SOON,
    "htlc": Refusal.NOT_P2PK,
    "duplicate_key": Refusal.MALFORMED_SECRET,
    "long_secret": Refusal.SECRET_TOO_LONG,
}


@pytest.fixture(scope="module")
def minted(mint: LocalMint) -> dict[str, Proof]:
    names = list(LOCKED)
    proofs = mint_secrets(mint.url, [LOCKED[n] for n in names])
    return dict(zip(names, proofs, strict=True))


@pytest.fixture(scope="module")
def keys(mint: LocalMint) -> MintKeys:
    return mint_keys(mint.url)


def good(minted: dict[str, Proof], *amounts: int) -> list[Proof]:
    return [minted[f"good_{a}"] for a in amounts]


# --- the payment key ------------------------------------------------------------------------


def test_payment_key_comes_from_the_mnemonic_at_its_own_path() -> None:
    # A fixed vector: a restore from the mnemonic must find the same key, release after release.
    assert PAYMENT_KEY_PATH.format(index=0) == "m/1381192786'/0'/0'"
    assert KEY.public_hex == "02b128ca0f998814961b2fbe40e30405f6734bbe70564a5dd5d3275e07454a8028"
    assert PaymentKey.from_mnemonic(MNEMONIC).public_hex == KEY.public_hex
    assert PaymentKey.from_mnemonic(MNEMONIC, index=1).public_hex != KEY.public_hex
    # Not nutshell's own P2PK key of the same mnemonic (m/129372'/0'/0'/0').
    from bip32 import BIP32

    from routstr_addon.ecash.seed import seed_from_mnemonic

    nutshell_key = BIP32.from_seed(seed_from_mnemonic(MNEMONIC)).get_pubkey_from_path(
        "m/129372'/0'/0'/0'")
    assert bytes(nutshell_key).hex() != KEY.public_hex
    # The private key is the path's, and never shown.
    private = key_private()
    assert NutshellPrivateKey(private).public_key.format().hex() == KEY.public_hex
    assert private.hex() not in repr(KEY) and KEY.public_hex in repr(KEY)
    with pytest.raises(ValueError):
        PaymentKey.from_mnemonic(MNEMONIC, index=2**31)


def test_the_key_signs_only_proofs_locked_to_it() -> None:
    secret = p2pk()
    witness = json.loads(KEY.witness(secret))
    assert list(witness) == ["signatures"] and len(witness["signatures"]) == 1
    assert len(bytes.fromhex(witness["signatures"][0])) == 64
    refused(Refusal.WRONG_KEY, KEY.witness, p2pk(data=OTHER.public_hex))
    refused(Refusal.NOT_LOCKED, KEY.witness, "a plain secret")
    refused(Refusal.SIG_ALL, KEY.witness, p2pk(tags=[["sigflag", "SIG_ALL"]]))


# --- the lock: strict, and never looser than the mint ---------------------------------------


def test_lock_is_read_as_cashu_ts_and_nutshell_write_it() -> None:
    cashu_ts = p2pk()  # what sendToRequest writes: compact JSON, "tags": []
    lock = parse_lock(cashu_ts)
    assert (lock.data, lock.locktime, lock.sigflag, lock.n_sigs) == (KEY.public_hex, None,
                                                                      "SIG_INPUTS", None)
    locktime = int(time.time()) + DAY
    nutshell_style = p2pk(tags=[["locktime", str(locktime)], ["sigflag", "SIG_INPUTS"]],
                          compact=False)
    lock = parse_lock(nutshell_style)
    assert lock.locktime == locktime
    check_lock(lock, KEY.public_hex, now() + 3600)
    refused(Refusal.LOCKTIME_TOO_SOON, check_lock, lock, KEY.public_hex, locktime + 1)
    assert looks_locked(cashu_ts) and looks_locked(" [") and not looks_locked("ab12")


@pytest.mark.parametrize("secret", [
    '["P2PK"]',
    '["P2PK",{"nonce":"n","data":"d"},1]',
    '["P2PK",{"nonce":"n"}]',
    '["P2PK",{"nonce":"","data":"d"}]',
    '["P2PK",{"nonce":"n","data":"d","extra":1}]',
    '["P2PK",{"nonce":"n","data":"d","tags":{}}]',
    '["P2PK",{"nonce":"n","data":"d","tags":[[]]}]',
    '["P2PK",{"nonce":"n","data":"d","tags":[["locktime",""]]}]',
    '["P2PK",{"nonce":"n","data":"d","tags":[["locktime",5]]}]',
    '["P2PK",{"nonce":"n","data":"d","tags":[["locktime","-5"]]}]',
    '["P2PK",{"nonce":"n","data":"d","tags":[["locktime","1","2"]]}]',
    '["P2PK",{"nonce":"n","data":"d","tags":[["locktime","1"],["locktime","2"]]}]',
    '["P2PK",{"nonce":"n","data":"d","tags":[["n_sigs","0"]]}]',
    '["P2PK",{"nonce":"n","data":"d","tags":[["sigflag","SIG_SOME"]]}]',
    '["P2PK",{"nonce":"n","data":"d","tags":[["pubkeys"]]}]',
    '["P2PK",{"nonce":"n","nonce":"m","data":"d"}]',
    '["P2PK", {"nonce": "n", "data": "d"',
    '[1,{"nonce":"n","data":"d"}]',
])
def test_malformed_secrets_are_refused_as_the_mint_refuses_them(secret: str) -> None:
    from cashu.core.nuts.nut10 import parse_spending_condition

    refused(Refusal.MALFORMED_SECRET, parse_lock, secret)
    # nutshell's mint refuses it too, or sees no lock at all (and would spend it unsigned).
    try:
        condition = parse_spending_condition(secret)
    except Exception:
        condition = None
    assert condition is None


_TAGS = st.sampled_from([
    ["sigflag", "SIG_INPUTS"], ["sigflag", "SIG_ALL"], ["sigflag", "x"], ["n_sigs", "1"],
    ["n_sigs", "2"], ["n_sigs", "0"], ["n_sigs", "01"], ["locktime", "4102444800"],
    ["locktime", "1"], ["locktime", "x"], ["locktime", "٣"], ["refund", OTHER.public_hex],
    ["pubkeys", OTHER.public_hex], ["pubkeys", KEY.public_hex], ["n_sigs_refund", "1"],
    ["expiry", "5"], ["locktime"], [""], ["sigflag", "SIG_INPUTS", "SIG_ALL"],
])


@st.composite
def secrets_near_ours(draw: st.DrawFn) -> str:
    """Secrets that differ from a good lock in one or more of the ways that matter."""
    kind = draw(st.sampled_from(["P2PK", "P2PK", "HTLC", "p2pk"]))
    data = draw(st.sampled_from([KEY.public_hex, KEY.public_hex, OTHER.public_hex,
                                 KEY.public_hex.upper(), "02" + "00" * 32, ""]))
    payload: dict[str, Any] = {"nonce": draw(st.sampled_from(["ab", "", "0" * 64])),
                               "data": data}
    if draw(st.booleans()):
        payload["tags"] = draw(st.lists(_TAGS, max_size=3))
    if draw(st.integers(0, 9)) == 0:
        payload["extra"] = "x"
    return json.dumps([kind, payload], separators=draw(st.sampled_from([(",", ":"), None])))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(secrets_near_ours())
def test_every_lock_we_accept_only_we_can_spend_at_a_nutshell_mint(secret: str) -> None:
    """The mint's own spending check (nutshell's ``LedgerSpendingConditions``) agrees: what we
    accept, our witness spends, and nothing else does (no witness, another key's)."""
    from cashu.mint.conditions import LedgerSpendingConditions

    try:
        check_lock(parse_lock(secret), KEY.public_hex, now() + 3600)
    except LockRefused:
        return
    mint_rules = LedgerSpendingConditions()
    proof = Proof(id="00ad268c4d1f5826", amount=1, secret=secret, C="02" + "11" * 32)
    assert mint_rules._verify_input_spending_conditions(
        proof.model_copy(update={"witness": KEY.witness(secret)}))
    foreign = witness_by(OTHER_PRIVATE, secret)
    for witness in (None, foreign):
        with pytest.raises(Exception):  # noqa: B017 - nutshell raises several types
            mint_rules._verify_input_spending_conditions(
                proof.model_copy(update={"witness": witness}))


def test_after_its_locktime_a_lock_without_refund_keys_is_anyones() -> None:
    """Why a locktime must lie ahead: past it, the mint lets anyone spend the proof."""
    from cashu.mint.conditions import LedgerSpendingConditions

    secret = p2pk(tags=[["locktime", str(int(time.time()) - 1)]])
    proof = Proof(id="00ad268c4d1f5826", amount=1, secret=secret, C="02" + "11" * 32)
    assert LedgerSpendingConditions()._verify_input_spending_conditions(proof)
    refused(Refusal.LOCKTIME_TOO_SOON, check_lock, parse_lock(secret), KEY.public_hex, now())


# --- hash_to_curve and DLEQ against nutshell ------------------------------------------------


@given(st.text(max_size=300))
def test_y_is_nutshells_hash_to_curve(secret: str) -> None:
    expected = b_dhke.hash_to_curve(secret.encode()).format().hex()
    assert y_hex(secret) == expected == hash_to_curve(secret.encode()).format().hex()
    assert expected == Proof(secret=secret).Y


def _carol(proof: Proof, a: Any) -> bool:
    """nutshell's verdict, an exception (invalid scalar or point) counting as a no."""
    assert proof.dleq is not None
    try:
        return bool(b_dhke.carol_verify_dleq(
            secret_msg=proof.secret, C=NutshellPublicKey(bytes.fromhex(proof.C)),
            r=NutshellPrivateKey(bytes.fromhex(proof.dleq.r)),
            e=NutshellPrivateKey(bytes.fromhex(proof.dleq.e)),
            s=NutshellPrivateKey(bytes.fromhex(proof.dleq.s)), A=a))
    except Exception:
        return False


def _tamper(proof: Proof, field: str, keyset_points: Any = None) -> Proof:
    """The proof with one field changed (a scalar incremented, C replaced by another point)."""
    assert proof.dleq is not None
    if field == "C":
        other = (NutshellPrivateKey(bytes.fromhex("05" * 32)).public_key)
        return proof.model_copy(update={"C": other.format().hex()})
    if field == "secret":
        return Proof(id=proof.id, amount=proof.amount, secret=proof.secret + " ", C=proof.C,
                     dleq=proof.dleq)
    value = (int(getattr(proof.dleq, field), 16) + 1).to_bytes(32, "big").hex()
    dleq = DLEQWallet(**{**proof.dleq.model_dump(), field: value})
    return proof.model_copy(update={"dleq": dleq})


FORGERIES = ["e", "s", "r", "C", "secret"]


SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@settings(max_examples=60, deadline=None)
@given(a=st.integers(1, SECP256K1_ORDER - 1), secret=st.text(max_size=120),
       field=st.sampled_from([None, *FORGERIES]))
def test_dleq_agrees_with_nutshell(a: int, secret: str, field: str | None) -> None:
    """Signed by nutshell's own mint-side functions with a random key; forged or not."""
    mint_key = NutshellPrivateKey(a.to_bytes(32, "big"))
    public = mint_key.public_key
    b_, r = b_dhke.step1_alice(secret)
    c_, e, s = b_dhke.step2_bob(b_, mint_key)
    c = b_dhke.step3_alice(c_, r, public)
    proof = Proof(id="00ad268c4d1f5826", amount=1, secret=secret, C=c.format().hex(),
                  dleq=DLEQWallet(e=e.to_hex(), s=s.to_hex(), r=r.to_hex()))
    keyset = MintKeyset("00ad268c4d1f5826", "sat", {1: public.format().hex()})
    if field is not None:
        proof = _tamper(proof, field)
    assert verify_dleq(proof, keyset) is _carol(proof, public) is (field is None)


def test_dleq_of_real_mint_proofs(minted: dict[str, Proof], keys: MintKeys) -> None:
    for name, proof in minted.items():
        keyset = keys.resolve(proof.id)
        assert verify_dleq(proof, keyset), name
        assert _carol(proof, NutshellPublicKey(bytes.fromhex(keyset.keys[proof.amount])))
    proof = minted["good_8"]
    keyset = keys.resolve(proof.id)
    a = NutshellPublicKey(bytes.fromhex(keyset.keys[8]))
    for field in FORGERIES:
        forged = _tamper(proof, field)
        assert not verify_dleq(forged, keyset), field
        assert not _carol(forged, a), field
    # The key of another amount: the mint did not sign it for that amount.
    relabelled = proof.model_copy(update={"amount": 4})
    assert not verify_dleq(relabelled, keyset)
    assert not verify_dleq(proof.model_copy(update={"dleq": None}), keyset)


# --- the whole token ------------------------------------------------------------------------


def test_a_good_token_is_accepted_with_its_amount_fee_and_ys(minted: dict[str, Proof],
                                                             keys: MintKeys,
                                                             mint: LocalMint) -> None:
    proofs = good(minted, 1, 2, 8)
    result = verify_payment(token(mint.url, proofs), keys, POLICY, now())
    assert (result.mint, result.unit, result.amount, result.fee, result.net) == (
        keys.mint, "sat", 11, 0, 11)
    assert result.ys == tuple(p.Y for p in proofs)  # nutshell's Y, in token order
    assert result.keyset_ids == tuple(p.id for p in proofs)
    assert result.locktimes == (None, None, None) and result.redeem_by is None
    assert [p.secret for p in result.proofs] == [p.secret for p in proofs]


def test_every_accepted_shape_of_lock(minted: dict[str, Proof], keys: MintKeys,
                                      mint: LocalMint) -> None:
    names = ["sigflag_inputs", "no_tags_field", "n_sigs_1", "locktime_far",
             *(f"good_{a}" for a in (1, 2, 4, 8))]
    result = verify_payment(token(mint.url, [minted[n] for n in names]), keys, POLICY, now())
    assert result.amount == 2 + 1 + 1 + 4 + 15
    locktime = parse_lock(minted["locktime_far"].secret).locktime
    assert result.redeem_by == locktime and locktime is not None
    # A margin beyond that locktime refuses the same token.
    refused(Refusal.LOCKTIME_TOO_SOON, verify_payment, token(mint.url, [minted[n] for n in names]),
            keys, replace(POLICY, locktime_margin=3 * DAY), now())


def test_short_keyset_ids_are_resolved_and_ambiguous_ones_refused(
        minted: dict[str, Proof], keys: MintKeys, mint: LocalMint) -> None:
    from cashu.core.base import TokenV4, TokenV4Proof, TokenV4Token

    proofs = good(minted, 4, 16)
    full_id = proofs[0].id
    assert full_id.startswith("01") and len(full_id) == 66
    short = TokenV4(m=mint.url, u="sat", t=[TokenV4Token(
        i=bytes.fromhex(full_id[:16]),
        p=[TokenV4Proof.from_proof(p, include_dleq=True) for p in proofs])])
    parsed = parse_token(short.serialize(include_dleq=True))
    assert {p.id for p in parsed.proofs} == {full_id[:16]}
    assert verify_payment(parsed, keys, POLICY, now()).keyset_ids == (full_id, full_id)
    # A second keyset sharing the short id (NUT-02: refuse rather than guess).
    real = keys.resolve(full_id)
    twin = replace(real, id=full_id[:16] + "f" * 50)
    ambiguous = MintKeys(mint.url, [real, twin])
    error = refused(Refusal.AMBIGUOUS_KEYSET, verify_payment, parsed, ambiguous, POLICY, now())
    assert error.index == 0
    # The full id still names one keyset.
    assert verify_payment(token(mint.url, proofs), ambiguous, POLICY, now()).amount == 20


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_each_misbuilt_lock_is_refused(name: str, minted: dict[str, Proof], keys: MintKeys,
                                       mint: LocalMint) -> None:
    proofs = [*good(minted, 1, 2), minted[name]]
    error = refused(REFUSALS[name], verify_payment, token(mint.url, proofs), keys, POLICY, now())
    assert error.index == 2 and "(proof 3)" in str(error)
    assert isinstance(error, TokenError) and error.status == 400


def test_forged_dleq_values_are_refused(minted: dict[str, Proof], keys: MintKeys,
                                        mint: LocalMint) -> None:
    for field in FORGERIES:
        proofs = [minted["good_1"], _tamper(minted["good_2"], field)]
        error = refused(Refusal.INVALID_DLEQ, verify_payment, raw_token(mint.url, proofs), keys,
                        POLICY, now())
        assert error.index == 1, field


def test_every_proof_needs_its_dleq(minted: dict[str, Proof], keys: MintKeys,
                                    mint: LocalMint) -> None:
    """Not only the first: nutshell's wallet check stops at the first proof without one."""
    proofs = good(minted, 1, 2, 4)
    stripped = [proofs[0], proofs[1], proofs[2].model_copy(update={"dleq": None})]
    error = refused(Refusal.MISSING_DLEQ, verify_payment, raw_token(mint.url, stripped), keys,
                    POLICY, now())
    assert error.index == 2
    no_dleq = parse_token(serialize_token(mint.url, "sat", [p.model_copy(update={"dleq": None})
                                                            for p in proofs]))
    refused(Refusal.MISSING_DLEQ, verify_payment, no_dleq, keys, POLICY, now())


def test_proofs_of_another_mint_are_refused(minted: dict[str, Proof], keys: MintKeys,
                                            mint: LocalMint, other_mint: LocalMint) -> None:
    foreign = mint_secrets(other_mint.url, [(p2pk(), 2)])
    # Its own keyset id: unknown here, even under our mint's URL.
    refused(Refusal.UNKNOWN_KEYSET, verify_payment, token(mint.url, foreign), keys, POLICY, now())
    # Relabelled with our keyset id: its DLEQ shows our mint did not sign it.
    relabelled = [foreign[0].model_copy(update={"id": minted["good_2"].id})]
    refused(Refusal.INVALID_DLEQ, verify_payment, token(mint.url, relabelled), keys, POLICY,
            now())
    # And a token naming another mint.
    refused(Refusal.UNTRUSTED_MINT, verify_payment, token(other_mint.url, foreign), keys, POLICY,
            now())


def test_proofs_misbuilt_around_the_lock_are_refused(minted: dict[str, Proof], keys: MintKeys,
                                                     mint: LocalMint) -> None:
    one, two = minted["good_1"], minted["good_2"]
    cases: list[tuple[Refusal, list[Proof], MintKeys, LockPolicy, str]] = [
        (Refusal.TOO_MANY_PROOFS, [one, two], keys, replace(POLICY, max_proofs=1), "sat"),
        (Refusal.UNKNOWN_KEYSET, [one, two.model_copy(update={"id": "00" + "ab" * 7})], keys,
         POLICY, "sat"),
        (Refusal.UNKNOWN_AMOUNT, [one, two.model_copy(update={"amount": 3})], keys, POLICY,
         "sat"),
        (Refusal.WRONG_UNIT, [one, two], keys, POLICY, "msat"),
        (Refusal.MALFORMED_PROOF, [one, two.model_copy(update={"C": two.C + "00"})], keys,
         POLICY, "sat"),
        (Refusal.BLINDED_KEY, [one, two.model_copy(update={"p2pk_e": OTHER.public_hex})], keys,
         POLICY, "sat"),
        (Refusal.DUPLICATE_PROOF, [one, two, two], keys, POLICY, "sat"),
        (Refusal.KEYSET_EXPIRING, [one, two], MintKeys(mint.url, [
            replace(k, final_expiry=int(now()) + 60) for k in keys.keysets.values()]), POLICY,
         "sat"),
    ]
    for reason, proofs, mint_keys_, policy, unit in cases:
        refused(reason, verify_payment, raw_token(mint.url, proofs, unit), mint_keys_, policy,
                now())
    # A keyset whose final expiry lies beyond the margin is fine, inactive or not.
    later = MintKeys(mint.url, [replace(k, final_expiry=int(now()) + 2 * DAY, active=False)
                                for k in keys.keysets.values()])
    assert verify_payment(token(mint.url, [one, two]), later, POLICY, now()).amount == 3


def test_the_replay_seam_runs_after_the_cheap_checks_and_before_any_dleq(
        minted: dict[str, Proof], keys: MintKeys, mint: LocalMint) -> None:
    proofs = good(minted, 1, 2, 4)
    asked: list[Sequence[str]] = []

    def ledger_knows(ys: Sequence[str]) -> set[str]:
        asked.append(ys)
        return {ys[1]}

    error = refused(Refusal.ALREADY_SPENT, verify_payment, token(mint.url, proofs), keys, POLICY,
                    now(), already_seen=ledger_knows)
    assert error.index == 1 and asked == [tuple(p.Y for p in proofs)]
    # Seen proofs with forged DLEQs: refused as seen, before any DLEQ work.
    forged = [_tamper(p, "e") for p in proofs]
    refused(Refusal.ALREADY_SPENT, verify_payment, raw_token(mint.url, forged), keys, POLICY,
            now(), already_seen=ledger_knows)
    # A lock refused: the ledger is not asked at all.
    asked.clear()
    refused(Refusal.WRONG_KEY, verify_payment, token(mint.url, [*proofs, minted["wrong_key"]]),
            keys, POLICY, now(), already_seen=ledger_knows)
    assert asked == []
    assert verify_payment(token(mint.url, proofs), keys, POLICY, now(),
                          already_seen=lambda ys: ()).amount == 7


def test_locks_are_checked_before_any_dleq(minted: dict[str, Proof], keys: MintKeys,
                                           mint: LocalMint) -> None:
    proofs = [_tamper(minted["good_1"], "s"), minted["sig_all"]]
    refused(Refusal.SIG_ALL, verify_payment, raw_token(mint.url, proofs), keys, POLICY, now())


def test_the_input_fee_is_nut02s(minted: dict[str, Proof], keys: MintKeys,
                                 mint: LocalMint) -> None:
    with_fee = MintKeys(mint.url, [replace(k, input_fee_ppk=100) for k in keys.keysets.values()])
    three = verify_payment(token(mint.url, good(minted, 1, 2, 4)), with_fee, POLICY, now())
    assert (three.amount, three.fee, three.net) == (7, 1, 6)  # ceil(300 / 1000)
    names = [f"good_{a}" for a in (1, 2, 4, 8, 16, 32, 64, 128)] + [
        "sigflag_inputs", "no_tags_field", "n_sigs_1"]
    eleven = verify_payment(token(mint.url, [minted[n] for n in names]), with_fee, POLICY, now())
    assert eleven.fee == 2  # ceil(1100 / 1000)


def test_keysets_from_the_wallet_are_the_same(keys: MintKeys, mint: LocalMint) -> None:
    async def load() -> MintKeys:
        wallet = MintWallet(mint.url)
        try:
            await wallet.load()
            return MintKeys(mint.url, [MintKeyset.from_keyset(k) for k in wallet.keysets.values()])
        finally:
            await wallet.client.aclose()

    from_wallet = asyncio.run(load())
    assert from_wallet.keysets == keys.keysets
    info = httpx.get(f"{mint.url}/v1/info", timeout=10).json()
    assert supports_locked_payments(info)
    del info["nuts"]["11"]
    assert not supports_locked_payments(info)
    assert not supports_locked_payments({})


# --- spending them: the witnesses, at the real mint ------------------------------------------


def test_our_witnesses_spend_the_locked_proofs_at_the_mint(minted: dict[str, Proof],
                                                           mint: LocalMint) -> None:
    locked = [minted["swap_a"], minted["swap_b"]]

    async def swap(inputs: Sequence[Proof]) -> list[Proof]:
        wallet = MintWallet(mint.url)
        try:
            await wallet.load()
            return await wallet.swap(inputs, [8, 4], "sat")
        finally:
            await wallet.client.aclose()

    with pytest.raises(MintError):  # no witness
        asyncio.run(swap(locked))
    foreign = [p.model_copy(update={"witness": witness_by(OTHER_PRIVATE, p.secret)})
               for p in locked]
    with pytest.raises(MintError):  # another key's signatures
        asyncio.run(swap(foreign))
    with pytest.raises(LockRefused):  # our key does not sign what is locked elsewhere
        sign_witnesses([*locked, minted["wrong_key"]], KEY)
    signed = sign_witnesses(locked, KEY)
    assert [p.witness for p in locked] == [None, None]  # copies: the inputs are left alone
    fresh = asyncio.run(swap(signed))
    assert sorted(p.amount for p in fresh) == [4, 8]
    with pytest.raises(MintError, match="spent"):
        asyncio.run(swap(signed))


def test_the_mint_will_not_spend_what_we_refuse_as_malformed(minted: dict[str, Proof],
                                                             mint: LocalMint) -> None:
    """A duplicate "data" key: our key is the last one, yet the mint refuses the proof."""
    proof = minted["duplicate_key"]
    signed = proof.model_copy(update={"witness": witness_by(key_private(), proof.secret)})

    async def swap() -> None:
        wallet = MintWallet(mint.url)
        try:
            await wallet.load()
            await wallet.swap([signed], [1], "sat")
        finally:
            await wallet.client.aclose()

    with pytest.raises(MintError):
        asyncio.run(swap())


# --- what real wallets send -----------------------------------------------------------------


def locked_request(mint_url: str, amount: int, pubkey: str = KEY.public_hex) -> str:
    """The creqA a 402 will carry: this amount, this mint, locked to the payment key."""
    request = PaymentRequest(a=amount, u="sat", m=[mint_url],
                             nut10=NUT10Option(k="P2PK", d=pubkey))
    encoded: str = nut18.serialize(request)
    return encoded


def test_cashu_ts_pays_a_locked_request_that_passes_offline(cashu_ts: CashuTs, mint: LocalMint,
                                                            keys: MintKeys) -> None:
    assert cashu_ts.version == json.loads(
        (Path(__file__).parent / "js" / "package.json").read_text())["dependencies"][
        "@cashu/cashu-ts"]
    request = locked_request(mint.url, 21)
    assert nut18.deserialize(request).nut10 == NUT10Option(k="P2PK", d=KEY.public_hex)
    text = cashu_ts.pay(mint.url, request)
    assert text.startswith("cashuB")
    paid = parse_token(text)
    assert all(len(p.id) == 16 for p in paid.proofs)  # cashu-ts shortens keyset ids
    result = verify_payment(paid, keys, POLICY, now())
    assert result.amount >= 21 and result.locktimes == (None,) * len(paid.proofs)
    assert all(parse_lock(p.secret).tags == () for p in paid.proofs)  # a permanent lock
    # Locked to our key only: the proxy of another key refuses it.
    refused(Refusal.WRONG_KEY, verify_payment, paid, keys, LockPolicy(OTHER.public_hex), now())


def test_cashu_ts_mints_proofs_with_dleq(cashu_ts: CashuTs, mint: LocalMint,
                                         keys: MintKeys) -> None:
    proofs = [Proof.from_dict(p) for p in cashu_ts.mint(mint.url, 13)]
    assert sorted(p.amount for p in proofs) == [1, 4, 8]
    assert all(verify_dleq(p, keys.resolve(p.id)) for p in proofs)
    refused(Refusal.NOT_LOCKED, verify_payment, token(mint.url, proofs), keys, POLICY, now())


@pytest.fixture
def nutshell_cli(mint: LocalMint, tmp_path: Path) -> Iterator[Any]:
    """nutshell's ``cashu`` command with a wallet of its own at the test mint."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "CASHU_DIR": str(tmp_path / "cashu"), "MINT_URL": mint.url, "DEBUG": "FALSE"}

    def run(*args: str) -> str:
        done = subprocess.run([str(BIN / "cashu"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    yield run


def test_nutshell_cashu_pay_of_a_locked_request_passes_offline(nutshell_cli: Any,
                                                               mint: LocalMint,
                                                               keys: MintKeys) -> None:
    assert "Invoice paid" in nutshell_cli("invoice", "100")
    output = nutshell_cli("-y", "pay", locked_request(mint.url, 21))
    found = re.search(r"cashuB[A-Za-z0-9_-]+", output)
    assert found, output
    paid = parse_token(found.group(0))
    result = verify_payment(paid, keys, POLICY, now())
    assert result.amount == 21
    # nutshell adds a locktime a day ahead (and no refund key): the batch swap must beat it.
    assert result.redeem_by is not None and 0 < result.redeem_by - now() <= DAY
    refused(Refusal.LOCKTIME_TOO_SOON, verify_payment, paid, keys,
            replace(POLICY, locktime_margin=DAY), now())


def test_a_nutshell_wallet_lock_is_accepted(user: UserWallet, keys: MintKeys,
                                            mint: LocalMint) -> None:
    async def send() -> str:
        wallet = user.wallet
        if wallet.available_balance.amount < 10:
            await user._fund(100)
        lock = await wallet.create_p2pk_lock(KEY.public_hex)  # adds sigflag SIG_INPUTS
        _, send = await wallet.swap_to_send(wallet.proofs, 10, secret_lock=lock,
                                            set_reserved=True)
        text: str = await wallet.serialize_proofs(send, include_dleq=True)
        return text

    paid = parse_token(user.run(send()))
    assert verify_payment(paid, keys, POLICY, now()).amount == 10
    assert all(parse_lock(p.secret).tag_names == {"sigflag"} for p in paid.proofs)
