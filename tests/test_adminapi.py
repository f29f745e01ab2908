"""The admin API for scripts (/admin/api/, RIP-07's shape) on a real mitmdump: the token,
its rate limit, secrets redacted, keys, the books, one request's trail, the journal."""

from __future__ import annotations

from typing import Any

from routstr_addon.ledger import hash_key

from .conftest import Proxy, raw

TOKEN = "admin-api-token-0123456789abcdef"
UPSTREAM_SECRET = "upstream-secret-not-to-be-shown"
PASSWORD = "a dashboard password"


def api(proxy: Proxy, method: str, path: str, token: str = TOKEN, **kw: Any) -> Any:
    return raw(proxy, method, f"/admin/api/{path}",
               headers={"authorization": f"Bearer {token}"}, **kw)


def test_the_admin_api_reads_and_changes_with_every_change_journaled(make_proxy: Any) -> None:
    proxy = make_proxy({"ADMIN_TOKEN": TOKEN, "ADMIN_PASSWORD": PASSWORD,
                        "UPSTREAM_API_KEY": UPSTREAM_SECRET})
    assert raw(proxy, "GET", "/admin/api/settings").status_code == 401
    settings = api(proxy, "GET", "settings")
    assert settings.status_code == 200
    values = settings.json()["settings"]
    assert values["ADMIN_PASSWORD"] == values["UPSTREAM_API_KEY"] == "<redacted>"
    assert values["ADMIN_TOKEN"] == "<redacted>" and values["MAX_REQUEST_SIZE"] == "32m"
    assert UPSTREAM_SECRET not in settings.text and PASSWORD not in settings.text
    upstreams = api(proxy, "GET", "upstreams").json()["upstreams"]
    assert upstreams[0]["api_key"] == "<redacted>" and upstreams[0]["base_url"].endswith("/v1")
    models = {m["id"]: m for m in api(proxy, "GET", "models").json()["models"]}
    assert models["test/model"]["max_cost_msat"] > 0

    created = api(proxy, "POST", "keys", json={"balance_sats": 50, "label": "script"})
    assert created.status_code == 201
    key, key_id = created.json()["api_key"], created.json()["id"]
    assert key_id == hash_key(key) and created.json()["balance_msat"] == 50_000
    paid = raw(proxy, "POST", "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
               json={"model": "test/model", "messages": [{"role": "user", "content": "hi"}]})
    assert paid.status_code == 200
    trail = api(proxy, "GET", f"logs/{paid.headers['x-routstr-request-id']}").json()
    assert [e["kind"] for e in trail["entries"]] == ["reserve", "charge"]
    assert -trail["entries"][1]["amount_msat"] == int(paid.headers["x-routstr-cost-msats"])
    assert api(proxy, "GET", "logs/no-such-request").status_code == 404
    recent = api(proxy, "GET", "logs/recent?kind=charge").json()["entries"]
    assert [(e["kind"], e["key_hash"]) for e in recent] == [("charge", key_id)]
    assert api(proxy, "GET", "temporary-balances").json() == {"reservations": [],
                                                              "total_msat": 0}
    one = api(proxy, "GET", f"keys/{key_id}").json()
    assert one["total_requests"] == 1 and one["reservations"] == []
    assert [k["id"] for k in api(proxy, "GET", "keys?q=script").json()["keys"]] == [key_id]

    assert api(proxy, "POST", f"keys/{key_id}/disable").json()["disabled"] is True
    refused = raw(proxy, "POST", "/v1/chat/completions",
                  headers={"authorization": f"Bearer {key}"},
                  json={"model": "test/model", "messages": [{"role": "user", "content": "x"}]})
    assert refused.status_code == 403
    assert api(proxy, "POST", f"keys/{key_id}/enable").json()["disabled"] is False
    assert api(proxy, "POST", f"keys/{'0' * 64}/disable").status_code == 404
    books = api(proxy, "GET", "balances").json()
    assert books["keys"]["count"] == 1 and books["books"]["operator_credit_msat"] > 0
    bad = api(proxy, "POST", "keys", json={"balance_sats": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "balance_sats"
    assert api(proxy, "POST", "withdraw", json={"amount_sats": 1}).json()["error"]["code"] \
        == "ecash_not_accepted"  # no wallet here
    assert api(proxy, "DELETE", "everything").status_code == 404

    actions = api(proxy, "GET", "journal").json()["actions"]
    assert [(a["actor"], a["action"], a["target"]) for a in actions] == [
        ("api", "key.enable", key_id), ("api", "key.disable", key_id),
        ("api", "key.create", key_id)]
    assert key not in proxy.output.text and TOKEN not in proxy.output.text


def test_wrong_tokens_are_limited_per_address_and_the_api_is_off_without_one(
        make_proxy: Any) -> None:
    proxy = make_proxy({"ADMIN_TOKEN": TOKEN})
    for _ in range(5):
        assert api(proxy, "GET", "balances", token="w" * 32).status_code == 401
    limited = api(proxy, "GET", "balances")  # even the right token, for the rest of the minute
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    off = make_proxy({}, name="off")
    answer = api(off, "GET", "settings")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "admin_api_off"


def test_withdrawing_the_margin_through_the_api(make_proxy: Any, mint: Any, user: Any) -> None:
    proxy = make_proxy({"ADMIN_TOKEN": TOKEN, "CASHU_MINTS": mint.url})
    created = raw(proxy, "POST", "/v1/balance/create", json={"cashu_token": user.token(100)})
    key = created.json()["api_key"]
    prompt = " ".join(["word"] * 3000)  # about 4 sats of prompt: the operator's margin
    paid = raw(proxy, "POST", "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
               json={"model": "test/model", "max_tokens": 5,
                     "messages": [{"role": "user", "content": prompt}]})
    assert paid.status_code == 200 and int(paid.headers["x-routstr-cost-msats"]) > 2000
    margin = api(proxy, "GET", "balances").json()["books"]["margin_msat"]
    assert margin > 2000
    too_much = api(proxy, "POST", "withdraw", json={"amount_sats": margin // 1000 + 1})
    assert too_much.status_code == 400 and too_much.json()["error"]["code"] == "over_margin"
    taken = api(proxy, "POST", "withdraw", json={"amount_sats": 2})
    assert taken.status_code == 200, taken.text
    assert user.receive(taken.json()["token"]) == 2
    after = api(proxy, "GET", "balances").json()["books"]["margin_msat"]
    assert after == margin - 2000
    [action] = api(proxy, "GET", "journal").json()["actions"]
    assert (action["actor"], action["action"], action["target"]) == ("api", "withdraw", mint.url)
    assert taken.json()["token"] not in proxy.output.text


def test_a_model_is_withdrawn_and_repriced_through_the_api(make_proxy: Any) -> None:
    from fractions import Fraction
    from math import ceil

    from .conftest import EXCHANGE_FEE, PROVIDER_FEE, RATE

    proxy = make_proxy({"ADMIN_TOKEN": TOKEN})
    key = proxy.new_key(sats=100)

    def chat() -> Any:
        return raw(proxy, "POST", "/v1/chat/completions",
                   headers={"authorization": f"Bearer {key}"},
                   json={"model": "test/model", "messages": [{"role": "user", "content": "hi"}]})

    usual = int(chat().headers["x-routstr-cost-msats"])
    off = api(proxy, "PATCH", "models/test/model", json={"enabled": False})
    assert off.status_code == 200 and off.json()["override"]["enabled"] is False
    refused = chat()
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_found"
    listed = [m["id"] for m in raw(proxy, "GET", "/v1/models").json()["data"]]
    assert "test/model" not in listed and "test/embed" in listed
    assert {"id": "test/model", "enabled": False, "override": {"enabled": False,
                                                               "pricing": None}} in \
        api(proxy, "GET", "models").json()["models"]
    price = {"prompt": "0", "completion": "0", "request": "0.0001"}
    back = api(proxy, "PATCH", "models/test/model", json={"enabled": True, "pricing": price})
    assert back.status_code == 200
    flat = ceil(Fraction("0.0001") * Fraction(EXCHANGE_FEE) * Fraction(PROVIDER_FEE) * 10**11
                / Fraction(RATE))
    assert int(chat().headers["x-routstr-cost-msats"]) == flat
    assert api(proxy, "PATCH", "models/test/model", json={"pricing": None}).status_code == 200
    assert int(chat().headers["x-routstr-cost-msats"]) == usual
    bad = api(proxy, "PATCH", "models/test/model", json={"pricing": {"prompt": "-1"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "pricing.prompt"
    assert api(proxy, "PATCH", "models/no/such", json={"enabled": False}).status_code == 404
    actions = [a["action"] for a in api(proxy, "GET", "journal").json()["actions"]]
    assert actions == ["model.override"] * 3
