"""The balance API as routstr-core's clients use it, through a real proxy: /v1/balance/info's
fields, child keys spending their parent's balance within their limits, /history, and the
Lightning invoice's routstr-core fields and recover endpoint."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ledger import hash_key

from .conftest import Proxy, books_balance, raw
from .ecash_user import UserWallet
from .test_lightning import wait_credited


def _post(proxy: Proxy, path: str, key: str, body: dict[str, Any]) -> Any:
    return raw(proxy, "POST", path, json=body, headers={"authorization": f"Bearer {key}"})


def _info(proxy: Proxy, key: str) -> dict[str, Any]:
    resp = raw(proxy, "GET", "/v1/balance/info", headers={"authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    info: dict[str, Any] = resp.json()
    return info


def test_child_keys_spend_the_parents_balance_within_their_limit(proxy: Proxy) -> None:
    parent = proxy.new_key(sats=200)
    made = _post(proxy, "/v1/balance/child-key", parent,
                 {"count": 2, "balance_limit": 2_000, "balance_limit_reset": "daily"})
    assert made.status_code == 200, made.text
    answer = made.json()
    assert answer["count"] == 2 and len(answer["api_keys"]) == 2
    child, other = answer["api_keys"]
    assert child.startswith("sk-") and answer["parent_balance"] == 200_000

    info = _info(proxy, child)
    assert info["is_child"] and info["balance"] == 200_000
    assert info["balance_limit"] == 2_000 and info["balance_limit_reset"] == "daily"
    assert info["parent_key_preview"].endswith("...")

    client = proxy.client(child)
    spent = 0
    with pytest.raises(openai.RateLimitError) as refused:  # the daily budget runs out: 429
        for _ in range(40):
            client.chat.completions.create(model="test/model", max_tokens=20,
                                           messages=[{"role": "user", "content": "hi"}])
            spent = _info(proxy, child)["total_spent"]
    assert refused.value.response.headers["retry-after"].isdigit()
    assert 0 < spent <= 2_000
    assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    parent_info = _info(proxy, parent)
    assert parent_info["balance"] == 200_000 - spent and not parent_info["is_child"]
    listed = {c["key_id"]: c for c in parent_info["child_keys"]}
    assert listed[hash_key(child)[:16]]["total_spent"] == spent
    assert listed[hash_key(other)[:16]]["total_spent"] == 0

    # the parent gives the child its budget back; a child cannot do it, nor refund, nor breed
    assert _post(proxy, "/v1/balance/child-key/reset", other, {"child_key": child}
                 ).status_code == 400
    assert _post(proxy, "/v1/balance/child-key/reset", parent, {"child_key": child}
                 ).json()["success"]
    client.chat.completions.create(model="test/model", max_tokens=20,
                                   messages=[{"role": "user", "content": "again"}])
    assert _post(proxy, "/v1/balance/child-key", child, {"count": 1}).status_code == 400
    assert raw(proxy, "GET", "/v1/balance/history",
               headers={"authorization": f"Bearer {child}"}).status_code == 400
    ledger = proxy.ledger()
    try:
        assert ledger.check() == []
    finally:
        ledger.close()


def test_child_limits_models_and_validity(proxy: Proxy) -> None:
    parent = proxy.new_key(sats=50)
    child = _post(proxy, "/v1/balance/child-key", parent,
                  {"count": 1, "models": ["test/embed"], "rpm": 5}).json()["api_keys"][0]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        proxy.client(child).chat.completions.create(
            model="test/model", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    changed = _post(proxy, "/v1/balance/child-key/limits", parent,
                    {"child_key": child, "models": ["test/model"], "rpm": 1})
    assert changed.status_code == 200 and changed.json()["limits"]["rpm"] == 1
    proxy.client(child).chat.completions.create(
        model="test/model", messages=[{"role": "user", "content": "hi"}])
    over = raw(proxy, "POST", "/v1/chat/completions",
               headers={"authorization": f"Bearer {child}"},
               json={"model": "test/model", "messages": [{"role": "user", "content": "hi"}]})
    assert over.status_code == 429 and 1 <= int(over.headers["retry-after"]) <= 60
    expired = _post(proxy, "/v1/balance/child-key", parent,
                    {"count": 1, "validity_date": 1}).json()["api_keys"][0]
    gone = raw(proxy, "POST", "/v1/chat/completions",
               headers={"authorization": f"Bearer {expired}"},
               json={"model": "test/model", "messages": [{"role": "user", "content": "hi"}]})
    assert gone.status_code == 403 and gone.json()["error"]["code"] == "key_expired"
    assert _post(proxy, "/v1/balance/child-key", parent, {"count": 51}).status_code == 400


def test_history_and_invoice_fields_as_routstr_core_reports_them(ecash_proxy: Proxy,
                                                                  mint: LocalMint) -> None:
    resp = raw(ecash_proxy, "POST", "/v1/balance/lightning/invoice",
               json={"amount_sats": 210, "purpose": "create"})
    invoice = resp.json()
    assert invoice["status"] == "pending" and len(invoice["payment_hash"]) == 64
    status = wait_credited(ecash_proxy, invoice["status_url"])
    assert status["status"] == "paid" and status["paid_at"] >= status["created_at"]
    assert status["payment_hash"] == invoice["payment_hash"]
    key = status["api_key"]
    child = _post(ecash_proxy, "/v1/balance/child-key", key, {"count": 1}).json()["api_keys"][0]
    refused = raw(ecash_proxy, "POST", "/v1/balance/refund",
                  headers={"authorization": f"Bearer {child}"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "child_key"
    recovered = raw(ecash_proxy, "POST", "/v1/balance/lightning/recover",
                    json={"bolt11": invoice["bolt11"]})
    assert recovered.status_code == 200 and recovered.json()["status"] == "paid"
    assert "api_key" not in recovered.json()  # the key only to the invoice id's holder
    assert raw(ecash_proxy, "POST", "/v1/balance/lightning/recover",
               json={"bolt11": "lnbc1nothere"}).status_code == 404
    history = raw(ecash_proxy, "GET", "/v1/balance/history",
                  headers={"authorization": f"Bearer {key}"}).json()["transactions"]
    assert [(t["type"], t["source"], t["amount"], t["unit"]) for t in history] == [
        ("in", "lightning", 210, "sat")]
    refund = raw(ecash_proxy, "POST", "/v1/balance/refund",
                 headers={"authorization": f"Bearer {key}"})
    assert refund.status_code == 200, refund.text
    history = raw(ecash_proxy, "GET", "/v1/balance/history",
                  headers={"authorization": f"Bearer {key}"}).json()["transactions"]
    assert (history[0]["type"], history[0]["amount"]) == ("out", 210)
    books_balance(ecash_proxy, mint.url)


def test_admin_sets_a_keys_limits(make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy({"ADMIN_PASSWORD": "limits-password"})
    key = proxy.new_key(sats=20)
    key_id = hash_key(key)[:16]
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.post("/admin/login", data={"password": "limits-password"}).status_code == 303
        found = re.search(r'name="csrf" value="([^"]+)"', c.get("/admin/keys").text)
        assert found is not None
        csrf = found.group(1)
        bad = c.post("/admin/keys/limits", data={"csrf": csrf, "key_id": key_id,
                                                 "period": "fortnightly"})
        assert bad.status_code == 303
        assert not proxy.key_state(key).restricted
        set_ = c.post("/admin/keys/limits", data={"csrf": csrf, "key_id": key_id, "rpm": "1",
                                                  "models": "test/model", "budget_sats": "5",
                                                  "period": "daily"})
        assert set_.status_code == 303
        page = c.get(set_.headers["location"]).text
        assert "1 rpm, models test/model, 5.000 sats per day" in page
    state = proxy.key_state(key)
    assert state.limits.rpm == 1 and state.limits.budget_msat == 5000
    body = {"model": "test/model", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"authorization": f"Bearer {key}"}
    assert raw(proxy, "POST", "/v1/chat/completions", json=body, headers=auth).status_code == 200
    second = raw(proxy, "POST", "/v1/chat/completions", json=body, headers=auth)
    assert second.status_code == 429 and "retry-after" in second.headers
    other = raw(proxy, "POST", "/v1/embeddings", headers=auth,
                json={"model": "test/embed", "input": "hi"})
    assert other.status_code == 403 and other.json()["error"]["code"] == "model_not_allowed"


def test_create_takes_routstr_cores_limit_parameters(ecash_proxy: Proxy, user: UserWallet,
                                                     mint: LocalMint) -> None:
    bad = raw(ecash_proxy, "POST", "/v1/balance/create",
              json={"initial_balance_token": "cashuBnotredeemed", "balance_limit_reset": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_limit"
    token = user.token(30)
    made = raw(ecash_proxy, "POST", "/v1/balance/create",
               json={"initial_balance_token": token, "balance_limit": 4000,
                     "balance_limit_reset": "daily"})
    assert made.status_code == 200, made.text
    info = _info(ecash_proxy, made.json()["api_key"])
    assert info["balance_limit"] == 4000 and info["balance_limit_reset"] == "daily"
    assert not info["is_child"] and info["balance"] == 30_000
    books_balance(ecash_proxy, mint.url)
