"""The wallet's seed (NUT-13) and its restore (NUT-09): secrets derived as nutshell derives them,
counters never handed out twice, and a wallet whose proofs table is lost found again, to the
sat, from its mnemonic alone at the real test mint."""

from __future__ import annotations

import asyncio
import json
import os
import random
import stat
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mnemonic import Mnemonic
from typer.testing import CliRunner

from cli.main import app
from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ecash.seed import (
    MNEMONIC_FILE,
    MnemonicError,
    bip32_path,
    derive,
    load_or_create_mnemonic,
    seed_from_mnemonic,
)
from routstr_addon.ecash.tokens import nutshell, parse_token, serialize_token
from routstr_addon.ecash.wallet import Wallet
from routstr_addon.ledger import Ledger, ProofRecord
from routstr_addon.settings import SettingError, load_config

from .ecash_user import UserWallet

# The mnemonic of NUT-13's test vectors.
NUT13_MNEMONIC = "half depart obvious quality work element tank gorilla view sugar picture humble"
V01_KEYSET = "01a98e12d4fdf571a47cd35018906fa6009cfcbf9b5802afc94e7ac87cb216131b"


def fresh_mnemonic() -> str:
    """A mnemonic of the test's own: the test mint is shared, and remembers every output it
    signed, so two tests deriving from one seed would collide there."""
    return str(Mnemonic("english").generate(128))


# --- derivation -----------------------------------------------------------------------------


def nutshell_derive(mnemonic: str, keyset_id: str, counter: int) -> tuple[str, bytes]:
    """The same output derived by nutshell's own wallet code (cashu.wallet.secrets)."""
    nutshell()
    from bip32 import BIP32
    from cashu.wallet.secrets import WalletSecrets

    seed = Mnemonic.to_seed(mnemonic)
    wallet: Any = SimpleNamespace(seed=seed, bip32=BIP32.from_seed(seed))
    derivation = (WalletSecrets._derive_secret_hmac_sha256 if keyset_id.startswith("01")
                  else WalletSecrets._derive_secret_bip32)
    secret, r, _ = asyncio.run(derivation(wallet, counter, keyset_id))
    return secret.hex(), r


@pytest.mark.parametrize("keyset_id", [V01_KEYSET, "009a1f293253e41e", "00ad268c4d1f5826"])
def test_derivation_is_nutshells(keyset_id: str) -> None:
    for mnemonic in (NUT13_MNEMONIC, fresh_mnemonic()):
        seed = seed_from_mnemonic(mnemonic)
        for counter in (0, 1, 2, 7, 100, 2**31 - 1):
            assert derive(seed, keyset_id, counter) == nutshell_derive(mnemonic, keyset_id,
                                                                      counter)
    if keyset_id.startswith("01"):  # 8-byte counters
        assert derive(seed, keyset_id, 2**40) == nutshell_derive(mnemonic, keyset_id, 2**40)
    else:  # BIP32 indexes stop at 2^31: never wrap around to a used one
        with pytest.raises(ValueError):
            derive(seed, keyset_id, 2**31)


def test_nut13_test_vectors_for_version_00_keysets() -> None:
    seed = seed_from_mnemonic(NUT13_MNEMONIC)
    vectors = {
        0: ("485875df74771877439ac06339e284c3acfcd9be7abf3bc20b516faeadfe77ae",
            "ad00d431add9c673e843d4c2bf9a778a5f402b985b8da2d5550bf39cda41d679"),
        1: ("8f2b39e8e594a4056eb1e6dbb4b0c38ef13b1b2c751f64f810ec04ee35b77270",
            "967d5232515e10b81ff226ecf5a9e2e2aff92d66ebc3edf0987eb56357fd6248"),
    }
    for counter, (secret, r) in vectors.items():
        assert derive(seed, "009a1f293253e41e", counter) == (secret, bytes.fromhex(r))


def test_version_00_path_formula() -> None:
    from bip32 import BIP32

    keyset_id = "009a1f293253e41e"
    assert int(keyset_id, 16) % (2**31 - 1) == 864559728
    assert bip32_path(keyset_id, 3) == "m/129372'/0'/864559728'/3'/0"
    seed = seed_from_mnemonic(NUT13_MNEMONIC)
    node = BIP32.from_seed(seed)
    secret, r = derive(seed, keyset_id, 3)
    assert secret == node.get_privkey_from_path(bip32_path(keyset_id, 3)).hex()
    assert r == node.get_privkey_from_path(bip32_path(keyset_id, 3)[:-1] + "1")


def test_version_01_is_hmac_sha256_of_the_documented_message() -> None:
    import hashlib
    import hmac

    seed = seed_from_mnemonic(NUT13_MNEMONIC)
    message = b"Cashu_KDF_HMAC_SHA256" + bytes.fromhex(V01_KEYSET) + (5).to_bytes(8, "big")
    assert derive(seed, V01_KEYSET, 5) == (
        hmac.new(seed, message + b"\x00", hashlib.sha256).hexdigest(),
        hmac.new(seed, message + b"\x01", hashlib.sha256).digest())


# --- the mnemonic ---------------------------------------------------------------------------


def test_wallet_mnemonic_setting_is_validated_and_never_shown() -> None:
    words = fresh_mnemonic()
    config = load_config({"WALLET_MNEMONIC": "  " + words.upper().replace(" ", "   ") + "\n"})
    assert config.wallet_mnemonic == words
    assert words.split()[0] not in repr(config)
    assert load_config({}).wallet_mnemonic == ""
    bad_checksum = NUT13_MNEMONIC.replace("humble", "zoo")
    for bad in ("not a mnemonic at all", bad_checksum, words + " " + words.split()[0]):
        with pytest.raises(SettingError, match=r"^WALLET_MNEMONIC: ") as e:
            load_config({"WALLET_MNEMONIC": bad})
        assert bad not in str(e.value)


def test_a_mnemonic_is_made_once_kept_private_and_shown_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    config = load_config({"DATA_DIR": str(tmp_path / "data")})
    made = load_or_create_mnemonic(config)
    path = tmp_path / "data" / MNEMONIC_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Mnemonic("english").check(made) and len(made.split()) == 12
    shown = capsys.readouterr()
    assert made.split()[0] in shown.err and made not in shown.out
    assert "back" in shown.err.lower() or "keep them safe" in shown.err
    assert not any(made.split()[5] in r.getMessage() for r in caplog.records)  # never logged
    assert load_or_create_mnemonic(config) == made  # read again, not shown again
    assert capsys.readouterr().err == ""
    assert [p.name for p in path.parent.iterdir()] == [MNEMONIC_FILE]  # no temporary left

    configured = fresh_mnemonic()  # WALLET_MNEMONIC wins, and makes no file
    other = load_config({"DATA_DIR": str(tmp_path / "other"), "WALLET_MNEMONIC": configured})
    assert load_or_create_mnemonic(other) == configured
    assert not (tmp_path / "other").exists()

    path.write_text("# edited by hand\nnot twelve good words\n")
    with pytest.raises(MnemonicError, match=MNEMONIC_FILE):
        load_or_create_mnemonic(config)


def test_processes_starting_together_agree_on_one_mnemonic(tmp_path: Path) -> None:
    config = load_config({"DATA_DIR": str(tmp_path / "data")})
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_mnemonic(config)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1


# --- counters -------------------------------------------------------------------------------


def test_counters_are_never_handed_out_twice(database_url: str) -> None:
    """Two threads, each with its own connection (as two processes), reserving at once."""
    Ledger(database_url).close()  # the schema, made once
    taken: list[list[range]] = [[], []]
    errors: list[BaseException] = []

    def reserve(slot: int) -> None:
        ledger = Ledger(database_url)
        counters = ledger.counters
        rng = random.Random(slot)
        try:
            for _ in range(150):
                n = rng.randint(1, 9)
                start = counters.reserve(V01_KEYSET, n)
                taken[slot].append(range(start, start + n))
        except BaseException as e:
            errors.append(e)
        finally:
            ledger.close()

    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    handed = [c for ranges in taken for r in ranges for c in r]
    assert len(handed) == len(set(handed))  # no counter twice
    assert sorted(handed) == list(range(len(handed)))  # and none skipped
    ledger = Ledger(database_url)
    try:
        counters = ledger.counters
        assert counters.current(V01_KEYSET) == len(handed)
        assert counters.current("01" + "00" * 32) == 0
        counters.advance(V01_KEYSET, 5)  # never backwards
        assert counters.current(V01_KEYSET) == len(handed)
        counters.advance(V01_KEYSET, len(handed) + 100)
        assert counters.reserve(V01_KEYSET, 1) == len(handed) + 100
    finally:
        ledger.close()


# --- restore --------------------------------------------------------------------------------


def unspent(ledger: Ledger) -> dict[str, int]:
    cur = ledger.db.connection().cursor()
    cur.execute("SELECT secret, amount FROM proofs WHERE state = 'unspent'")
    return {secret: int(amount) for secret, amount in cur.fetchall()}


def test_restore_finds_exactly_the_unspent_proofs_again(mint: LocalMint, user: UserWallet,
                                                        database_url: str) -> None:
    """A wallet receives tokens and sends some (which the user redeems); its proofs table and
    counters are lost; from the mnemonic alone, restore brings back exactly what it held, and
    the wallet goes on without reusing a secret."""
    mnemonic = fresh_mnemonic()
    tokens = [user.token(a) for a in (100, 37, 64, 5, 300)]
    more = user.token(21)

    async def scenario() -> None:
        ledger = Ledger(database_url)
        wallet = Wallet(ledger, [mint.url], seed=seed_from_mnemonic(mnemonic))
        await wallet.start()
        try:
            await run(ledger, wallet)
        finally:
            await wallet.close()
            ledger.close()

    async def receive(ledger: Ledger, wallet: Wallet, token: str) -> None:
        redeemed = await wallet.redeem(parse_token(token))
        with ledger.transaction() as tx:
            wallet.store_in(tx, redeemed.mint, redeemed.unit, redeemed.proofs, "unspent")

    async def run(ledger: Ledger, wallet: Wallet) -> None:
        for token in tokens:
            await receive(ledger, wallet, token)
        sent = [await wallet.send(mint.url, "sat", amount, f"send-{amount}")
                for amount in (50, 64, 3)]  # a swap, exact proofs, a swap
        for token, fee in sent:
            assert fee == 0
            assert user.receive(token) > 0  # spent at the mint: must not come back
        keyset = wallet.primary.active("sat")
        counters = ledger.counters
        used = counters.current(keyset.id)
        held = unspent(ledger)
        balance = wallet.balances()[(wallet.primary.url, "sat")]
        assert balance == 506 - 117 == sum(held.values())

        with ledger.transaction() as tx:  # the loss
            tx.execute("DELETE FROM proofs")
            tx.execute("DELETE FROM keyset_counters")
        assert wallet.balances() == {} and counters.current(keyset.id) == 0

        messages: list[str] = []
        result = await wallet.restore(messages.append)
        assert result["errors"] == [] and messages
        (found,) = result["mints"]
        assert found["mint"] == wallet.primary.url and found["unit"] == "sat"
        assert found["restored"] == balance and result["restored_msat"] == balance * 1000
        assert found["restored_proofs"] == len(held)
        assert found["spent"] > 0 and found["pending"] == 0 and found["skipped"] == 0
        assert unspent(ledger) == held  # the very proofs, and nothing the user redeemed
        assert wallet.balances() == {(wallet.primary.url, "sat"): balance}
        assert counters.current(keyset.id) == used == found["keysets"][keyset.id]

        await receive(ledger, wallet, more)  # new secrets: the mint would refuse old ones
        assert wallet.balances()[(wallet.primary.url, "sat")] == balance + 21
        assert counters.current(keyset.id) > used

        # A proof spent behind the ledger's back is marked spent; the rest is known already.
        victim_secret, victim_amount = next(iter(unspent(ledger).items()))
        with ledger.snapshot() as tx:
            row = tx.row("SELECT secret, keyset_id, amount, c, dleq FROM proofs "
                         "WHERE secret = ?", (victim_secret,))
        from routstr_addon.ecash.wallet import _proof

        victim = _proof(ProofRecord(*row))
        assert user.receive(serialize_token(wallet.primary.url, "sat", [victim])) == \
            victim_amount
        again = await wallet.restore()
        (second,) = again["mints"]
        assert second["restored"] == 0 and second["marked_spent"] == victim_amount
        assert second["known"] == balance + 21 - victim_amount
        assert sum(unspent(ledger).values()) == balance + 21 - victim_amount
        assert ledger.check() == []

        # Another mnemonic finds nothing of this wallet.
        stranger = Wallet(ledger, [mint.url], seed=seed_from_mnemonic(fresh_mnemonic()))
        try:
            nothing = await stranger.restore()
            assert nothing["restored_msat"] == 0 and nothing["mints"][0]["found"] == 0
        finally:
            await stranger.close()

    asyncio.run(scenario())


def test_a_wallet_without_a_seed_still_works_and_cannot_restore(mint: LocalMint, user: UserWallet,
                                                               tmp_path: Path) -> None:
    from routstr_addon.ecash.wallet import WalletError

    async def scenario() -> None:
        ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
        wallet = Wallet(ledger, [mint.url])
        try:
            redeemed = await wallet.redeem(parse_token(user.token(9)))
            assert redeemed.amount == 9
            assert ledger.counters.current(wallet.primary.active("sat").id) == 0
            with pytest.raises(WalletError):
                await wallet.restore()
        finally:
            await wallet.close()
            ledger.close()

    asyncio.run(scenario())


# --- the command ----------------------------------------------------------------------------


runner = CliRunner()


def test_cli_restore(mint: LocalMint, user: UserWallet, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`wallet receive` makes the data folder's mnemonic; after the proofs are lost, `wallet
    restore --json` finds them with it; without any mnemonic, or a bad one, it exits 2."""
    monkeypatch.chdir(tmp_path)
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    for name in ("WALLET_MNEMONIC", "UPSTREAM_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("CASHU_MINTS", mint.url)

    result = runner.invoke(app, ["wallet", "restore", "--json"])
    assert result.exit_code == 2 and "no mnemonic" in result.output

    result = runner.invoke(app, ["wallet", "receive", "--json", user.token(77)])
    assert result.exit_code == 0, result.output
    mnemonic_file = tmp_path / "data" / MNEMONIC_FILE
    assert mnemonic_file.exists() and oct(os.stat(mnemonic_file).st_mode & 0o777) == "0o600"
    words = load_or_create_mnemonic(load_config())
    assert words.split()[0] in result.stderr  # shown once, on stderr, not in the JSON
    assert json.loads(result.stdout)["amount"] == 77

    ledger = Ledger(database_url)
    try:
        with ledger.transaction() as tx:
            tx.execute("DELETE FROM proofs")
    finally:
        ledger.close()

    result = runner.invoke(app, ["wallet", "restore", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and data["errors"] == [] and data["restored_msat"] == 77_000
    assert data["mints"][0]["restored"] == 77 and data["mints"][0]["mint"] == mint.url

    result = runner.invoke(app, ["wallet", "restore", "--json", "--mnemonic", "-"],
                           input=words + "\n")  # from stdin: all of it is known now
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["restored_msat"] == 0 and data["mints"][0]["known"] == 77

    result = runner.invoke(app, ["wallet", "restore", "--mnemonic", "twelve wrong words"])
    assert result.exit_code == 2 and "--mnemonic" in result.output

    result = runner.invoke(app, ["wallet", "restore"])  # the table, for people
    assert result.exit_code == 0, result.output
    assert "restored 0.000 sats" in result.stdout and mint.url in result.stdout

    result = runner.invoke(app, ["wallet", "restore", "--help"])
    assert "not yet redeemed" in result.stdout
