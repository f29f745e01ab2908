"""The request path's hooks in process: mitmproxy's ``taddons`` and ``tflow`` drive the addon as
mitmdump does (its sub-addons, in mitmproxy's order), without sockets. Each test checks what
the client gets, what would go upstream, and the books. The end-to-end tests beside these keep
a real mitmdump for what only a socket shows (streaming on the wire, timeouts, crashes)."""

from __future__ import annotations

import asyncio
import copy
import gzip
import inspect
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import brotli
import pytest
from mitmproxy import ctx, http
from mitmproxy.addonmanager import traverse
from mitmproxy.io import tnetstring
from mitmproxy.test import taddons, tflow

from routstr_addon import settings
from routstr_addon.addon import Routstr, Serving
from routstr_addon.ledger import hash_key
from routstr_addon.metering.meter import Paid
from routstr_addon.runtime import Runtime

from .conftest import EXCHANGE_FEE, MODELS, PROVIDER_FEE, RATE, expected_msat

MODEL = "test/model"
UPSTREAM = "http://upstream.test:8000"
CHAT = "/v1/chat/completions"
USAGE = {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29}


@dataclass
class Hooks:
    """The addon under taddons, and a way to run one of mitmproxy's events through it."""

    addon: Routstr

    @property
    def runtime(self) -> Runtime:
        serving = self.addon.serving
        assert isinstance(serving, Serving), "the addon did not configure itself"
        return serving.runtime

    def hook(self, name: str, flow: http.HTTPFlow) -> None:
        """Call every hook of this event, sub-addons included, awaiting what they return."""
        for addon in traverse([self.addon]):
            func = getattr(addon, name, None)
            if callable(func):
                result = func(flow)
                if inspect.isawaitable(result):
                    asyncio.run(_wait(result))

    def key(self, sats: int = 1000) -> str:
        return self.runtime.ledger.create_key(sats * 1000)[0]

    def available(self, key: str) -> int:
        state = self.runtime.ledger.key(hash_key(key))
        assert state is not None
        return state.available_msat

    def audit(self) -> None:
        ledger = self.runtime.ledger
        assert ledger.check() == []
        assert ledger.open_reservations() == []


async def _wait(result: Any) -> None:
    await result


@pytest.fixture
def proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hooks]:
    for s in settings.SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env but ours
    models = tmp_path / "models.json"
    models.write_text(json.dumps(MODELS))
    addon = Routstr()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, data_dir=str(tmp_path), models_path=str(models),
                       btc_usd_price=RATE, exchange_fee=EXCHANGE_FEE,
                       upstream_provider_fee=PROVIDER_FEE, upstream_base_url=f"{UPSTREAM}/v1",
                       upstream_api_key="sk-upstream", upstream_timeout=0)
        hooks = Hooks(addon)
        try:
            yield hooks
        finally:
            hooks.runtime.ledger.close()


def request(key: str | None = None, path: str = CHAT, method: str = "POST",
            body: dict[str, Any] | bytes | None = None, **headers: str) -> http.HTTPFlow:
    if body is None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}]}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    fields: dict[str | bytes, str | bytes] = {"content-type": "application/json",
                                              **{k.replace("_", "-"): v for k, v in
                                                 headers.items()}}
    if key is not None:
        fields["authorization"] = f"Bearer {key}"
    return tflow.tflow(req=http.Request.make(method, f"http://proxy.test:8080{path}", raw,
                                             fields))


def answer(flow: http.HTTPFlow, status: int = 200, usage: dict[str, int] | None = USAGE,
           text: str = "hello there") -> None:
    body: dict[str, Any] = {"id": "c", "object": "chat.completion", "model": MODEL,
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": text}}]}
    if usage is not None:
        body["usage"] = usage
    if status >= 400:
        body = {"error": {"message": "upstream broke", "type": "server_error"}}
    flow.response = http.Response.make(status, json.dumps(body).encode(),
                                       {"content-type": "application/json"})


def event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(text: str) -> bytes:
    return event({"object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


USAGE_CHUNK = event({"object": "chat.completion.chunk", "choices": [], "usage": USAGE})


def open_stream(proxy: Hooks, flow: http.HTTPFlow) -> Any:
    flow.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    proxy.hook("responseheaders", flow)
    stream = flow.response.stream
    assert callable(stream)
    return stream


def assert_error(flow: http.HTTPFlow, status: int, code: str) -> None:
    assert flow.response is not None
    assert flow.response.status_code == status
    error = json.loads(flow.response.content or b"")["error"]
    assert error["code"] == code and error["message"]


def assert_not_forwarded(flow: http.HTTPFlow) -> None:
    assert flow.request.host == "proxy.test"
    assert "routstr" not in flow.metadata


# --- authentication -------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Basic dXNlcjpwYXNz", "Bearer",
                                           "Bearer sk-nobody-knows-this-key"])
def test_no_bad_or_unknown_key_is_401_and_never_forwarded(proxy: Hooks,
                                                          authorization: str | None) -> None:
    flow = request()
    if authorization is not None:
        flow.request.headers["authorization"] = authorization
    proxy.hook("request", flow)
    assert_error(flow, 401, "invalid_api_key")
    assert_not_forwarded(flow)


def test_an_unknown_key_is_401_even_with_a_bad_body(proxy: Hooks) -> None:
    flow = request("sk-unknown", body=b"{not json")
    proxy.hook("request", flow)
    assert_error(flow, 401, "invalid_api_key")


def test_ecash_on_a_proxy_without_mints_is_400_whichever_way_it_comes(proxy: Hooks) -> None:
    as_key = request("cashuBnotreallyatoken")
    proxy.hook("request", as_key)
    assert_error(as_key, 400, "ecash_not_accepted")
    by_header = request(x_cashu="cashuBnotreallyatoken")
    proxy.hook("request", by_header)
    assert_error(by_header, 400, "ecash_not_accepted")
    topup = request("sk-any", "/v1/balance/topup", body={"cashu_token": "cashuBx"})
    proxy.hook("request", topup)
    assert_error(topup, 400, "ecash_not_accepted")
    proxy.audit()


# --- pricing and reservation ----------------------------------------------------------------


def test_a_funded_key_reserves_the_maximum_and_the_upstream_gets_what_was_priced(
        proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key, CHAT + "?trace=1", x_cashu_extra="kept")
    proxy.hook("request", flow)
    assert flow.response is None and flow.error is None
    paid = flow.metadata["routstr"]
    assert type(paid) is Paid
    held = proxy.runtime.ledger.open_reservations()
    assert [(r["request_id"], r["amount_msat"]) for r in held] == [(flow.id,
                                                                    paid.reserved_msat)]
    assert proxy.available(key) == 1000_000 - paid.reserved_msat
    assert paid.reserved_msat >= expected_msat(MODEL, 0, 512)  # room for the whole answer
    req = flow.request
    assert (req.scheme, req.host, req.port) == ("http", "upstream.test", 8000)
    assert req.path == "/v1/chat/completions"  # built by the proxy: no client query string
    assert req.headers["accept-encoding"] == "identity"
    assert json.loads(req.content or b"") == json.loads(request(key).request.content or b"")
    assert req.headers["authorization"] == "Bearer sk-upstream"  # the operator's, not the key
    assert req.headers["x-cashu-extra"] == "kept"


def test_a_key_without_enough_balance_is_402_and_nothing_is_held(proxy: Hooks) -> None:
    key = proxy.key(sats=0)
    flow = request(key)
    proxy.hook("request", flow)
    assert_error(flow, 402, "insufficient_balance")
    assert_not_forwarded(flow)
    proxy.audit()


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "invalid_json"),
    ({"messages": []}, "model_required"),
    ({"model": "no/such-model", "messages": []}, "model_not_found"),
])
def test_a_request_that_cannot_be_priced_is_400_and_nothing_is_held(
        proxy: Hooks, body: dict[str, Any] | bytes, code: str) -> None:
    flow = request(proxy.key(), body=body)
    proxy.hook("request", flow)
    assert_error(flow, 400, code)
    assert_not_forwarded(flow)
    proxy.audit()


# --- settlement -----------------------------------------------------------------------------


def test_a_json_answer_is_charged_its_usage_exactly(proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key)
    proxy.hook("request", flow)
    answer(flow)
    proxy.hook("responseheaders", flow)
    proxy.hook("response", flow)
    cost = expected_msat(MODEL, 9, 20)
    resp = flow.response
    assert resp is not None
    assert resp.headers["x-routstr-cost-msats"] == str(cost)
    assert resp.headers["x-routstr-balance-msats"] == str(1000_000 - cost)
    assert resp.headers["x-routstr-request-id"] == flow.id
    assert proxy.available(key) == 1000_000 - cost
    proxy.audit()
    # The flow keeps its one state; its copies (saved, exported) carry plain facts only.
    paid = flow.metadata["routstr"]
    assert type(paid) is Paid and paid.closed is not None
    assert f"charged {cost} msat" in flow.comment and hash_key(key)[:16] in flow.comment
    saved = copy.deepcopy(flow.metadata)["routstr"]
    assert saved == {"key_id": hash_key(key)[:16], "model": MODEL,
                     "reserved_msat": paid.reserved_msat, "charged_msat": cost,
                     "paid_by": "key"}
    assert b"charged_msat" in tnetstring.dumps(flow.get_state())


def test_an_answer_without_usage_is_charged_an_estimate(proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key)
    proxy.hook("request", flow)
    answer(flow, usage=None, text="x" * 80)
    proxy.hook("response", flow)
    charged = 1000_000 - proxy.available(key)
    assert 0 < charged < flow.metadata["routstr"].reserved_msat
    assert charged == expected_msat(MODEL, 2, 20)  # "Say hi": 6 chars; 80 chars: 20 tokens
    proxy.audit()


def test_an_upstream_error_releases_everything(proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key)
    proxy.hook("request", flow)
    answer(flow, status=500)
    proxy.hook("responseheaders", flow)
    proxy.hook("response", flow)
    assert flow.response is not None and flow.response.status_code == 500
    assert flow.response.headers["x-routstr-cost-msats"] == "0"
    assert proxy.available(key) == 1000_000
    proxy.audit()


# --- streams --------------------------------------------------------------------------------


def test_a_stream_passes_at_once_drops_our_usage_chunk_and_ends_with_its_cost(
        proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key, body={"model": MODEL, "stream": True,
                              "messages": [{"role": "user", "content": "Say hi"}]})
    proxy.hook("request", flow)
    sent = json.loads(flow.request.content or b"")
    assert sent["stream_options"] == {"include_usage": True}  # asked for on the client's behalf
    stream = open_stream(proxy, flow)
    assert flow.response is not None
    assert flow.response.headers["x-routstr-reserved-msats"] == str(
        flow.metadata["routstr"].reserved_msat)
    assert stream(chunk("Hel")) == chunk("Hel")
    assert stream(chunk("lo")[:10]) == ()  # half an event waits for the rest
    assert stream(chunk("lo")[10:]) == chunk("lo")
    assert stream(USAGE_CHUNK) == ()  # the usage the client did not ask for
    cost = expected_msat(MODEL, 9, 20)
    # Settled at [DONE]: the cost goes before it, where OpenAI clients still read.
    assert stream(b"data: [DONE]\n\n") == b": x-routstr-cost-msats %d x-routstr-balance-msats " \
        b"%d\n\ndata: [DONE]\n\n" % (cost, 1000_000 - cost)
    assert stream(b"") == ()
    proxy.hook("response", flow)  # already settled: nothing more
    assert proxy.available(key) == 1000_000 - cost
    assert f"charged {cost} msat" in flow.comment
    proxy.audit()


def test_a_stream_whose_client_asked_for_usage_keeps_the_usage_chunk(proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key, body={"model": MODEL, "stream": True,
                              "stream_options": {"include_usage": True},
                              "messages": [{"role": "user", "content": "Say hi"}]})
    body = flow.request.content
    proxy.hook("request", flow)
    assert flow.request.content == body  # sent as the client wrote it
    stream = open_stream(proxy, flow)
    out = stream(chunk("Hi") + USAGE_CHUNK)
    assert isinstance(out, bytes) and out.startswith(chunk("Hi"))
    # The usage chunk comes through, with its cost as routstr-core's clients read it.
    usage = json.loads(out[len(chunk("Hi")):].removeprefix(b"data: "))["usage"]
    cost = expected_msat(MODEL, 9, 20)
    assert usage["prompt_tokens"] == 9 and usage["cost"]["total_msats"] == cost
    assert usage["cost_sats"] == cost / 1000
    assert b"x-routstr-cost-msats" in stream(b"")
    assert proxy.available(key) == 1000_000 - cost
    proxy.audit()


# --- failures -------------------------------------------------------------------------------


def test_a_client_gone_before_the_upstream_was_reached_releases_everything(
        proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key)
    proxy.hook("request", flow)
    flow.server_conn.timestamp_tcp_setup = None  # still connecting to the upstream
    flow.error = tflow.terr("Client disconnected.")
    proxy.hook("error", flow)
    assert proxy.available(key) == 1000_000
    assert "charged 0 msat" in flow.comment
    proxy.audit()


def test_a_client_gone_before_any_answer_pays_for_its_prompt(proxy: Hooks) -> None:
    """Issue 11 rule 5: the upstream has the request and works (and bills) anyway."""
    key = proxy.key()
    flow = request(key)
    proxy.hook("request", flow)
    assert flow.server_conn.timestamp_tcp_setup is not None  # sent upstream
    flow.error = tflow.terr("Client disconnected.")
    proxy.hook("error", flow)
    assert 1000_000 - proxy.available(key) == expected_msat(MODEL, 2, 0)  # "Say hi": 2 tokens
    proxy.audit()


def test_an_upstream_failing_before_any_answer_releases_everything(proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key)
    proxy.hook("request", flow)
    flow.error = tflow.terr("Server disconnected.")
    proxy.hook("error", flow)
    assert proxy.available(key) == 1000_000
    proxy.audit()


def test_a_client_gone_mid_stream_pays_for_what_was_delivered(proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key, body={"model": MODEL, "stream": True,
                              "messages": [{"role": "user", "content": "Say hi"}]})
    proxy.hook("request", flow)
    stream = open_stream(proxy, flow)
    stream(chunk("y" * 80))
    flow.error = tflow.terr("client disconnected")
    proxy.hook("error", flow)
    assert 1000_000 - proxy.available(key) == expected_msat(MODEL, 2, 20)
    proxy.audit()


def test_the_ledger_away_is_503_before_and_a_retried_settlement_after(proxy: Hooks) -> None:
    key = proxy.key()
    ledger = proxy.runtime.ledger
    connection = ledger.db.connection()
    connection.execute("PRAGMA query_only = ON")  # every write fails, as on a full disk
    refused = request(key)
    proxy.hook("request", refused)
    assert_error(refused, 503, "ledger_unavailable")
    assert_not_forwarded(refused)

    connection.execute("PRAGMA query_only = OFF")
    flow = request(key)
    proxy.hook("request", flow)
    answer(flow)
    connection.execute("PRAGMA query_only = ON")
    proxy.hook("response", flow)  # the answer goes out; its settlement waits for the ledger
    assert flow.response is not None and "x-routstr-cost-msats" not in flow.response.headers
    paid = flow.metadata["routstr"]
    assert paid.retrying and not paid.settled
    proxy.hook("error", flow)  # nothing else settles it meanwhile
    proxy.runtime.meter.retry_unsettled()
    assert not paid.settled
    connection.execute("PRAGMA query_only = OFF")
    proxy.runtime.meter.retry_unsettled()
    assert paid.settled and not paid.retrying
    assert proxy.available(key) == 1000_000 - expected_msat(MODEL, 9, 20)
    proxy.audit()


# --- what is not forwarded ------------------------------------------------------------------


def test_local_endpoints_are_answered_here_and_never_metered(proxy: Hooks) -> None:
    info = request(path="/v1/info", method="GET", body=b"")
    proxy.hook("request", info)
    assert info.response is not None and info.response.status_code == 200
    assert json.loads(info.response.content or b"")["pricing"] == "model_based"
    assert_not_forwarded(info)
    wrong = request(path="/v1/models", method="DELETE", body=b"")
    proxy.hook("request", wrong)
    assert_error(wrong, 405, "method_not_allowed")


def test_before_any_valid_configuration_every_request_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "mysql://nope")
    addon = Routstr()
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        flow = request("sk-any")
        Hooks(addon).hook("request", flow)
    assert_error(flow, 503, "not_configured")
    assert_not_forwarded(flow)


# --- forward only what was priced (issue 11) -------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/batches", "/v1/files", "/v1/realtime/sessions",
                                  "/v1/Batches/", "/v1/chat/completions/..%2F..%2Fbatches",
                                  "/v1/images/generations"])
def test_an_unsupported_endpoint_is_404_and_never_forwarded(proxy: Hooks, path: str) -> None:
    flow = request(proxy.key(), path)
    proxy.hook("request", flow)
    assert_error(flow, 404, "unsupported_endpoint")
    assert_not_forwarded(flow)
    proxy.audit()


@pytest.mark.parametrize("path", ["/v1/chat/%63ompletions?x=1", "/v1//chat//completions//",
                                  "/v1/x/../chat/completions", "/v1/CHAT/Completions;p=1"])
def test_any_spelling_goes_upstream_as_the_canonical_path_without_its_query(
        proxy: Hooks, path: str) -> None:
    flow = request(proxy.key(), path)
    proxy.hook("request", flow)
    assert flow.response is None and flow.request.path == "/v1/chat/completions"
    assert flow.metadata["routstr"].endpoint == "chat"


def test_a_fixed_price_endpoint_is_forwarded_at_its_price(proxy: Hooks) -> None:
    assert proxy.runtime.config.fixed_price_endpoints == {}
    ctx.options.update(fixed_price_endpoints="images/generations=7")  # a new runtime
    key = proxy.key()
    flow = request(key, "/v1/Images/Generations?size=big", body=b"--multipart--",
                   content_type="multipart/form-data; boundary=x")
    proxy.hook("request", flow)
    assert flow.response is None and flow.request.path == "/v1/images/generations"
    assert flow.request.content == b"--multipart--"  # not priced from its body: passed as is
    answer(flow, usage=None)
    proxy.hook("response", flow)
    assert proxy.available(key) == 1000_000 - 7000
    proxy.audit()


def test_a_websocket_upgrade_is_refused_unless_priced(proxy: Hooks) -> None:
    flow = request(proxy.key(), method="GET", body=b"", upgrade="websocket",
                   connection="Upgrade")
    proxy.hook("request", flow)
    assert_error(flow, 400, "upgrade_refused")
    assert_not_forwarded(flow)


def test_a_compressed_body_is_priced_decoded_and_forwarded_plain(proxy: Hooks) -> None:
    body = json.dumps({"model": MODEL, "n": 2, "max_tokens": 10,
                       "messages": [{"role": "user", "content": "Say hi"}]}).encode()
    flow = request(proxy.key(), accept_encoding="gzip, br")
    flow.request.headers["content-encoding"] = "gzip"
    flow.request.raw_content = gzip.compress(body)
    proxy.hook("request", flow)
    assert flow.response is None
    req = flow.request
    assert "content-encoding" not in req.headers and req.headers["accept-encoding"] == "identity"
    assert json.loads(req.content or b"") == json.loads(body)
    assert req.headers["content-length"] == str(len(req.raw_content or b""))
    assert flow.metadata["routstr"].reserved_msat >= expected_msat(MODEL, 0, 20)


@pytest.mark.parametrize(("body", "headers", "status", "param"), [
    (b'{"model": "test/model", "messages": [], "n": 1, "n": 4}', {}, 400, "n"),
    (b'{"model": "test/model", "messages": [], "N": 4}', {}, 400, "N"),
    (b'{"model": "test/model", "messages": [], "stream": "true"}', {}, 400, "stream"),
    (b'{"model": "test/model", "messages": [], "n": "4"}', {}, 400, "n"),
    (b'{"model": "test/model", "messages": []}', {"content_encoding": "compress"}, 415, None),
])
def test_a_body_the_upstream_could_read_differently_is_refused(
        proxy: Hooks, body: bytes, headers: dict[str, str], status: int,
        param: str | None) -> None:
    flow = request(proxy.key(), body=body)
    flow.request.headers.update({k.replace("_", "-"): v for k, v in headers.items()})
    proxy.hook("request", flow)
    assert flow.response is not None and flow.response.status_code == status
    assert json.loads(flow.response.content or b"")["error"]["param"] == param
    assert_not_forwarded(flow)
    proxy.audit()


def test_the_gate_refuses_secrets_in_the_query_and_huge_heads(proxy: Hooks) -> None:
    token = request(path="/v1/balance/create?initial_balance_token=cashuBxyz", body=b"{}")
    proxy.hook("requestheaders", token)
    assert_error(token, 400, "secret_in_url")
    proxy.hook("request", token)  # the local endpoint leaves it answered
    assert_error(token, 400, "secret_in_url")
    big = request(proxy.key(), x_big="a" * (65 << 10))
    proxy.hook("requestheaders", big)
    assert_error(big, 431, "request_header_fields_too_large")


def test_a_compressed_stream_is_decoded_before_the_tap(proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key, body={"model": MODEL, "stream": True,
                              "messages": [{"role": "user", "content": "Say hi"}]})
    proxy.hook("request", flow)
    flow.response = http.Response.make(200, b"", {"content-type": "text/event-stream",
                                                  "content-encoding": "gzip"})
    proxy.hook("responseheaders", flow)
    assert "content-encoding" not in flow.response.headers  # the client gets it plain
    stream = flow.response.stream
    assert callable(stream)
    z = zlib.compressobj(wbits=31)
    plain = chunk("Hello") + USAGE_CHUNK + b"data: [DONE]\n\n"
    out = b""
    for i in range(0, len(plain), 20):
        got = stream(z.compress(plain[i:i + 20]) + z.flush(zlib.Z_SYNC_FLUSH))
        out += got if isinstance(got, bytes) else b"".join(got)
    tail = stream(b"")
    out += tail if isinstance(tail, bytes) else b"".join(tail)
    assert out.startswith(chunk("Hello")) and b"data: [DONE]\n\n" in out
    assert b'"usage"' not in out  # the usage chunk we asked for is dropped
    assert proxy.available(key) == 1000_000 - expected_msat(MODEL, 9, 20)
    proxy.audit()


def test_a_compressed_json_answer_is_charged_and_delivered_plain(proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key)
    proxy.hook("request", flow)
    answer(flow)
    assert flow.response is not None
    flow.response.headers["content-encoding"] = "br"
    flow.response.raw_content = brotli.compress(flow.response.raw_content or b"")
    proxy.hook("responseheaders", flow)
    proxy.hook("response", flow)
    assert "content-encoding" not in flow.response.headers
    delivered = json.loads(flow.response.raw_content or b"")["usage"]
    assert {k: delivered[k] for k in USAGE} == USAGE
    assert proxy.available(key) == 1000_000 - expected_msat(MODEL, 9, 20)
    proxy.audit()


@pytest.mark.parametrize(("usage", "floor"), [
    ({"prompt_tokens": -9, "completion_tokens": -20}, expected_msat(MODEL, 2, 3)),
    ({"prompt_tokens": 10**12, "completion_tokens": 10**12}, None),
])
def test_usage_is_bounded_by_the_estimate_and_the_reservation(
        proxy: Hooks, usage: dict[str, int], floor: int | None) -> None:
    key = proxy.key()
    flow = request(key)
    proxy.hook("request", flow)
    answer(flow, usage=usage, text="x" * 12)
    proxy.hook("response", flow)
    charged = 1000_000 - proxy.available(key)
    assert charged == (floor if floor is not None else flow.metadata["routstr"].reserved_msat)
    proxy.audit()


def test_an_anthropic_stream_is_metered_from_its_events(proxy: Hooks) -> None:
    key = proxy.key()
    flow = request(key, "/v1/messages", body={
        "model": MODEL, "max_tokens": 50, "stream": True,
        "messages": [{"role": "user", "content": "Say hi"}]})
    proxy.hook("request", flow)
    assert flow.request.path == "/v1/messages"
    assert "stream_options" not in json.loads(flow.request.content or b"")
    stream = open_stream(proxy, flow)
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 20}}}
    stream(b"event: message_start\n" + event(start))
    stream(b"event: content_block_delta\n" + event(
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}))
    stream(b"event: message_delta\n" + event({"type": "message_delta", "usage": {
        "output_tokens": 30}}))
    stream(b"")
    assert 1000_000 - proxy.available(key) == expected_msat(MODEL, 125, 30)
    proxy.audit()
