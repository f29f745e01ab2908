"""What users' addresses may make the proxy do (issue 11 items 6 and 10, issue 12 item 3):
refund addresses in every form routstr-core takes, paid over Lightning on refund, fetched only
over https from public addresses unless ALLOW_PRIVATE_LN_ADDRESSES; Key-Expiry-Time bounded;
invoices rate-limited per client; the real client behind a trusted reverse proxy."""

from __future__ import annotations

import asyncio
import math
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bech32 import bech32_encode, convertbits

from routstr_addon.dev.demo import run_in_thread
from routstr_addon.dev.localmint import LocalMint
from routstr_addon.errors import ApiError
from routstr_addon.netguard import NetPolicy, public_address
from routstr_addon.payments.cashu import MAX_KEY_LIFETIME, KeyTerms
from routstr_addon.payments.lnurl import LnAddressError, pay_url
from routstr_addon.web import forwarded_client
from routstr_addon.web.limits import RateLimit
from tests.ecash_user import UserWallet

from .conftest import Proxy, books_balance, raw, start_proxy
from .lnaddress import LnAddressServer


@pytest.fixture
def ln_server(other_mint: LocalMint) -> Iterator[LnAddressServer]:
    with run_in_thread(LnAddressServer(other_mint.url)) as server:
        assert isinstance(server, LnAddressServer)
        yield server


def lnurl(url: str) -> str:
    data = convertbits(url.encode(), 8, 5)
    assert data is not None
    return bech32_encode("lnurl", data).upper()


def proxy_env(upstream: Any, mint: LocalMint, **extra: str) -> dict[str, str]:
    return {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mint.url, **extra}


# --- the rules, directly ----------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "public"), [
    ("1.1.1.1", True), ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("127.8.9.1", False), ("::1", False), ("0.0.0.0", False),  # noqa: S104
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("100.64.0.1", False),
    ("169.254.169.254", False), ("fe80::1", False), ("fc00::1", False), ("224.0.0.1", False),
    ("ff02::1", False), ("240.0.0.1", False), ("255.255.255.255", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("not an ip", False),
])
def test_which_addresses_count_as_public(ip: str, public: bool) -> None:
    assert public_address(ip) is public


def test_every_form_of_refund_address_routstr_core_takes_resolves_to_its_pay_url() -> None:
    url = "https://pay.example.com/lnurlp/alice?tag=x"
    assert pay_url("alice@example.com") == "https://example.com/.well-known/lnurlp/alice"
    assert pay_url("lightning:alice@example.com") == \
        "https://example.com/.well-known/lnurlp/alice"
    assert pay_url(lnurl(url)) == url
    assert pay_url(lnurl(url).lower()) == url
    assert pay_url(f"LIGHTNING:{lnurl(url)}") == url
    assert pay_url("lnurlp://pay.example.com/lnurlp/alice") == \
        "https://pay.example.com/lnurlp/alice"
    assert pay_url(url) == url
    assert pay_url("lnurlp://abc.onion/p").startswith("http://abc.onion")
    # plain http only where the guard decides (private networks need ALLOW_PRIVATE_LN_ADDRESSES)
    assert pay_url("bob@10.1.2.3:8080") == "http://10.1.2.3:8080/.well-known/lnurlp/bob"
    assert pay_url(lnurl("http://192.168.1.9/p")) == "http://192.168.1.9/p"
    for bad in ("nobody", "lnurl1qqqqqq", "ftp://example.com/x", "http://example.com/pay",
                "alice@", "https:///x"):
        with pytest.raises(LnAddressError):
            pay_url(bad)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1000", "0", "-5", "abc",
                                   "1e400", str(int(time.time()) - 10),
                                   str(int(time.time() + MAX_KEY_LIFETIME) + 3600)])
def test_key_expiry_time_must_be_a_finite_future_time_within_ten_years(value: str) -> None:
    with pytest.raises(ApiError) as e:
        KeyTerms.parse(value, None)
    assert e.value.status == 400 and e.value.code == "invalid_expiry"


def test_good_key_terms_are_kept() -> None:
    later = time.time() + 3600
    terms = KeyTerms.parse(f"{later}", lnurl("https://example.com/p"))
    assert terms.expires_at == later and math.isfinite(terms.expires_at)
    assert terms.refund_address is not None and terms.refund_address.startswith("LNURL1")
    with pytest.raises(ApiError) as e:
        KeyTerms.parse(None, "not an address")
    assert e.value.code == "invalid_refund_address"


def test_the_real_client_behind_trusted_proxies_is_the_rightmost_untrusted_hop() -> None:
    trusted = ("127.0.0.1/32", "10.0.0.0/8")
    assert forwarded_client("127.0.0.1", "203.0.113.7", trusted) == "203.0.113.7"
    # a client that sends its own X-Forwarded-For cannot choose its address
    assert forwarded_client("127.0.0.1", "1.2.3.4, 203.0.113.7", trusted) == "203.0.113.7"
    assert forwarded_client("127.0.0.1", "203.0.113.7, 10.1.1.1", trusted) == "203.0.113.7"
    assert forwarded_client("127.0.0.1", "10.1.1.1, 10.2.2.2", trusted) == "10.1.1.1"
    assert forwarded_client("127.0.0.1", "", trusted) == "127.0.0.1"


def test_rate_limits_are_per_address() -> None:
    limit = RateLimit(window=60)
    assert [limit.take("a", 3, now=0) for _ in range(3)] == [0, 0, 0]
    assert limit.take("a", 3, now=1) == 59
    assert limit.take("b", 3, now=1) == 0  # another address is not affected
    assert limit.take("a", 3, now=61) == 0  # the window moved on


class Listener:
    """A TCP port that records whether anybody connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def test_the_guarded_client_never_connects_to_loopback_names_or_plain_http() -> None:
    listener = Listener()

    async def attempts() -> list[str]:
        errors = []
        async with NetPolicy().client(timeout=5) as client:
            for url in (f"https://localhost:{listener.port}/.well-known/lnurlp/a",
                        f"https://127.0.0.1:{listener.port}/",
                        f"https://[::ffff:127.0.0.1]:{listener.port}/",
                        f"http://example.com:{listener.port}/"):
                with pytest.raises(httpx.ConnectError) as e:
                    await client.get(url)
                errors.append(str(e.value))
        return errors

    errors = asyncio.run(attempts())
    assert all("public address" in e for e in errors[:3]), errors
    assert "must use https" in errors[3]
    assert listener.connections == 0
    listener.sock.close()


# --- end to end ------------------------------------------------------------------------------


def test_a_refund_address_on_loopback_is_never_fetched(
        upstream: Any, mint: LocalMint, user: UserWallet, ln_server: LnAddressServer,
        tmp_path: Path) -> None:
    """The SSRF of issue 11: a user's Refund-LNURL pointing at the proxy's own machine."""
    victim = f"victim{secrets.token_hex(3)}"
    proxy = start_proxy(tmp_path / "p", upstream.url,
                        proxy_env(upstream, mint, REFUND_PROCESSING_INTERVAL="1"))
    try:
        targets = [ln_server.address(victim),
                   lnurl(f"{ln_server.url}/.well-known/lnurlp/{victim}")]
        keys = []
        for target in targets:
            token = user.token(50)
            created = raw(proxy, "POST", "/v1/balance/create",
                          json={"initial_balance_token": token},
                          headers={"Refund-LNURL": target,
                                   "Key-Expiry-Time": f"{time.time() + 3:.3f}"})
            assert created.status_code == 200, created.text
            keys.append(created.json()["api_key"])
        refused = raw(proxy, "POST", "/v1/balance/refund",
                      headers={"authorization": f"Bearer {keys[0]}"})
        assert refused.status_code == 502, refused.text
        assert refused.json()["error"]["code"] == "refund_address_failed"
        time.sleep(5)  # both keys expired; the refund timer ran a few times
        assert ln_server.requests_for(victim) == []
        assert ln_server.asked == [] or all(a.user != victim for a in ln_server.asked)
        for key in keys:
            assert proxy.key_state(key).balance_msat == 50_000  # still the user's
        proxy.output.wait_for("not made: .*(must use https|not a public address)")
        books_balance(proxy, mint.url)
    finally:
        proxy.stop()


@pytest.mark.parametrize("form", ["address", "bech32"])
def test_refund_pays_the_keys_refund_address_and_names_the_recipient(
        upstream: Any, mint: LocalMint, user: UserWallet, ln_server: LnAddressServer,
        tmp_path: Path, form: str) -> None:
    bob = f"bob{secrets.token_hex(3)}"
    target = (ln_server.address(bob) if form == "address"
              else lnurl(f"{ln_server.url}/.well-known/lnurlp/{bob}"))
    proxy = start_proxy(tmp_path / "p", upstream.url,
                        proxy_env(upstream, mint, ALLOW_PRIVATE_LN_ADDRESSES="true"))
    try:
        token = user.token(120)
        # Refund-LNURL and Key-Expiry-Time on the first use of a token as the key
        expires = int(time.time()) + 3600
        info = raw(proxy, "GET", "/v1/balance/info",
                   headers={"authorization": f"Bearer {token}", "Refund-LNURL": target,
                            "Key-Expiry-Time": str(expires)})
        assert info.status_code == 200, info.text
        assert info.json()["refund_address"] == target and info.json()["expiry_time"] == expires
        refund = raw(proxy, "POST", "/v1/balance/refund",
                     headers={"authorization": f"Bearer {token}"})
        assert refund.status_code == 200, refund.text
        body = refund.json()
        assert body["recipient"] == target and body["state"] == "paid"
        assert body["msats"] == 120_000 and "token" not in body
        (asked,) = ln_server.requests_for(bob)
        assert asked.amount_msat == body["paid_sats"] * 1000 <= 120_000
        assert proxy.key_state(info.json()["api_key"]).balance_msat == 0
        books_balance(proxy, mint.url)
    finally:
        proxy.stop()


def test_bad_key_terms_on_a_tokens_first_use_are_400_and_redeem_nothing(
        ecash_proxy: Proxy, user: UserWallet) -> None:
    token = user.token(60)
    for headers in ({"Key-Expiry-Time": "nan"}, {"Key-Expiry-Time": "1000"},
                    {"Refund-LNURL": "http://metadata.google.internal/computeMetadata"}):
        resp = raw(ecash_proxy, "POST", "/v1/chat/completions",
                   json={"model": "test/model", "messages": [{"role": "user", "content": "x"}]},
                   headers={"authorization": f"Bearer {token}", **headers})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] in ("Key-Expiry-Time", "Refund-LNURL")
    assert not user.spent(token)


def test_invoices_are_rate_limited_per_client_behind_a_trusted_proxy(
        upstream: Any, mint: LocalMint, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path / "p", upstream.url,
                        proxy_env(upstream, mint, INVOICES_PER_MINUTE="3",
                                  FORWARDED_ALLOW_IPS="127.0.0.1"))
    try:
        def invoice(client: str) -> httpx.Response:
            return raw(proxy, "POST", "/lightning/invoice", json={"amount_sats": 5},
                       headers={"x-forwarded-for": client})

        assert [invoice("203.0.113.1").status_code for _ in range(3)] == [200, 200, 200]
        limited = invoice("203.0.113.1")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
        assert limited.json()["error"]["code"] == "rate_limited"
        assert invoice("203.0.113.2").status_code == 200  # another client is not affected
    finally:
        proxy.stop()


def test_admin_login_limits_follow_the_real_client(upstream: Any, tmp_path: Path) -> None:
    password = "correct horse battery"
    behind = start_proxy(tmp_path / "behind", upstream.url,
                         {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "ADMIN_PASSWORD": password,
                          "FORWARDED_ALLOW_IPS": "127.0.0.1"})
    direct = start_proxy(tmp_path / "direct", upstream.url,
                         {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "ADMIN_PASSWORD": password})
    try:
        def login(proxy: Proxy, pw: str, client: str) -> int:
            return raw(proxy, "POST", "/admin/login", data={"password": pw},
                       headers={"x-forwarded-for": client}).status_code

        # Behind Caddy every connection comes from 127.0.0.1: an attacker's failures lock
        # out the attacker only.
        assert [login(behind, "wrong", "198.51.100.66") for _ in range(5)] == [401] * 5
        assert login(behind, "wrong", "198.51.100.66") == 429
        assert login(behind, password, "198.51.100.66") == 429
        assert login(behind, password, "192.0.2.10") == 303  # the operator gets in
        # Without FORWARDED_ALLOW_IPS the header is not believed: no escaping the limit by
        # inventing addresses.
        assert [login(direct, "wrong", f"198.51.100.{i}") for i in range(5)] == [401] * 5
        assert login(direct, password, "192.0.2.10") == 429
    finally:
        behind.stop()
        direct.stop()


def test_a_token_naming_a_mint_on_loopback_is_never_fetched(
        upstream: Any, mint: LocalMint, other_mint: LocalMint, tmp_path: Path) -> None:
    """SWAP_UNTRUSTED_MINTS melts tokens at the mint they name: a URL the user chose. It is
    reached like users' addresses (https, public), so a token of a local mint is refused."""
    from routstr_addon.dev.demo import run_in_thread as serve

    from .mintfront import MintFront

    with serve(MintFront(other_mint.url)) as front:
        assert isinstance(front, MintFront)
        stranger = UserWallet(front.url, tmp_path / "stranger")
        proxy = start_proxy(tmp_path / "p", upstream.url,
                            proxy_env(upstream, mint, SWAP_UNTRUSTED_MINTS="true"))
        try:
            token = stranger.token(100)
            calls = len(front.calls)
            resp = raw(proxy, "POST", "/v1/balance/create",
                       json={"initial_balance_token": token})
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["code"] == "untrusted_mint"
            assert len(front.calls) == calls  # the proxy never connected to it
            assert not stranger.spent(token)
        finally:
            proxy.stop()
            stranger.close()


def test_a_nostr_listing_cannot_point_the_proxy_at_its_own_machine(proxy: Proxy) -> None:
    """/v1/providers asks every listed provider for /v1/info; anyone can publish a listing on
    a public relay. With public relays, listed URLs on loopback are never fetched; with only
    local relays (a private setup, the tests) they are."""
    from routstr_addon.discovery.nostr import Provider, check

    listener = Listener()

    def listing(url: str) -> Provider:
        return Provider("p", "00" * 32, 0, [url], [], None, "evil", None, "{}", "e")

    guarded = asyncio.run(check(listing(f"http://127.0.0.1:{listener.port}"), "", 5,
                                guard=True))
    assert guarded is None and listener.connections == 0
    listener.sock.close()
    local = asyncio.run(check(listing(proxy.url), "", 5, guard=False))  # answers /v1/info
    assert local is not None and local.endpoint_url == proxy.url
