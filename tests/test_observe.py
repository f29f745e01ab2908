"""Operating the proxy: liveness and readiness, the request log, metrics — on a real mitmdump."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from typing import Any

import httpx

from routstr_addon.dev.localmint import free_port
from routstr_addon.ledger import hash_key

from .conftest import Proxy, raw


def ready(proxy: Proxy) -> httpx.Response:
    return raw(proxy, "GET", "/ready")


def wait_ready(proxy: Proxy, status: int, timeout: float = 15.0) -> dict[str, Any]:
    """Ask /ready until it answers ``status``; its body."""
    deadline = time.monotonic() + timeout
    while True:
        resp = ready(proxy)
        if resp.status_code == status or time.monotonic() > deadline:
            assert resp.status_code == status, resp.text
            body: dict[str, Any] = resp.json()
            return body
        time.sleep(0.3)


def test_health_serves_and_ready_names_each_check_with_its_age(proxy: Proxy) -> None:
    assert raw(proxy, "GET", "/health").json() == {"status": "ok"}
    body = wait_ready(proxy, 200)
    assert body["status"] == "ready"
    checks = body["checks"]
    assert set(checks) == {"ledger", "rate", "upstream"}  # no mint configured: no mint check
    assert all(c["ok"] for c in checks.values())
    assert 0 <= checks["ledger"]["age_s"] < 2
    assert checks["rate"]["detail"] == "fixed BTC_USD_PRICE"
    assert 0 <= checks["upstream"]["age_s"] <= checks["upstream"]["limit_s"]


def test_ready_is_503_while_the_upstream_is_away(make_proxy: Any) -> None:
    port = free_port()  # nothing listens there
    proxy = make_proxy({"UPSTREAM_BASE_URL": f"http://127.0.0.1:{port}/v1"},
                       mode_target=f"http://127.0.0.1:{port}")
    body = wait_ready(proxy, 503)
    assert body["status"] == "not_ready"
    assert body["checks"]["upstream"]["ok"] is False
    assert body["checks"]["upstream"]["age_s"] is None
    assert "Connect" in body["checks"]["upstream"]["detail"]
    assert body["checks"]["ledger"]["ok"] is True
    assert raw(proxy, "GET", "/health").status_code == 200  # alive all the same


# --- the line per request -----------------------------------------------------------------


def request_lines(proxy: Proxy, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The JSON request line of one request in the proxy's output."""
    found = proxy.output.wait_for(r'^\{"time".*"request_id":"' + re.escape(request_id) + '"',
                                  timeout)
    line: dict[str, Any] = json.loads(found.string)
    return line


def test_one_json_line_per_request_with_money_and_times_and_never_the_key(
        make_proxy: Any) -> None:
    proxy = make_proxy({"LOG_FORMAT": "json"})
    own = proxy.output.wait_for(r'^\{"time":"[^"]+Z","level":"info","logger":"routstr",'
                                r'"message":"routstr: model-based pricing')
    assert json.loads(own.string)["message"].startswith("routstr: ")  # our own lines too
    key = proxy.new_key(sats=100)
    paid = raw(proxy, "POST", "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
               json={"model": "test/model", "messages": [{"role": "user", "content": "hi"}]})
    assert paid.status_code == 200
    line = request_lines(proxy, paid.headers["x-routstr-request-id"])
    assert line["key_id"] == hash_key(key)[:16] and line["paid_by"] == "key"
    assert (line["method"], line["endpoint"], line["model"], line["status"]) == (
        "POST", "/v1/chat/completions", "test/model", 200)
    assert line["charged_msat"] == int(paid.headers["x-routstr-cost-msats"]) > 0
    assert line["reserved_msat"] >= line["charged_msat"]
    assert 0 < line["upstream_ms"] <= line["total_ms"]
    assert line["bytes_in"] > 0 and line["bytes_out"] == len(paid.content)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    with proxy.client(key).chat.completions.create(
            model="test/model", stream=True,
            messages=[{"role": "user", "content": "one two three"}]) as stream:
        streamed_id = stream.response.headers["x-routstr-request-id"]
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    line = request_lines(proxy, streamed_id)
    assert line["status"] == 200 and line["charged_msat"] > 0 and line["bytes_out"] > 0
    refused = raw(proxy, "POST", "/v1/chat/completions?x=1",
                  headers={"authorization": "Bearer sk-" + "0" * 64}, json={"model": "test/model"})
    assert refused.status_code == 401
    proxy.output.wait_for(r'"endpoint":"/v1/chat/completions","model":null,"status":401')
    assert key not in proxy.output.text and key[3:] not in proxy.output.text


def test_text_lines_by_default_and_log_level_honoured(make_proxy: Any) -> None:
    proxy = make_proxy({"LOG_LEVEL": "warning"})
    assert raw(proxy, "GET", "/v1/info").status_code == 200
    line = proxy.output.wait_for(r"^time=\S+ request_id=\S+ method=GET endpoint=/v1/info "
                                 r"status=200 total_ms=[\d.]+ bytes_in=0 bytes_out=\d+$")
    assert "key_id" not in line.string
    assert "pricing, ledger sqlite" not in proxy.output.text  # an info line of the proxy's
    chatty = make_proxy({"LOG_LEVEL": "info", "LOG_FORMAT": "off"}, name="chatty")
    assert raw(chatty, "GET", "/v1/info").status_code == 200
    chatty.output.wait_for("pricing, ledger sqlite")
    time.sleep(0.5)
    assert "request_id" not in chatty.output.text


def test_client_disconnects_and_a_stop_with_open_connections_are_quiet(make_proxy: Any) -> None:
    proxy = make_proxy()
    key = proxy.new_key(sats=100)
    port = int(proxy.url.rsplit(":", 1)[1])
    held = []
    for _ in range(3):  # keep-alive connections left open
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        held.append(conn)
    cut = socket.create_connection(("127.0.0.1", port))  # a client gone mid-request
    cut.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + key.encode() + b"\r\nContent-Length: 500\r\n\r\n{")
    cut.close()
    with httpx.Client(base_url=proxy.v1, timeout=10) as client, client.stream(
            "POST", "/chat/completions", headers={"authorization": f"Bearer {key}"},
            json={"model": "test/model", "stream": True,
                  "messages": [{"role": "user", "content": "a b c d e f g"}]}) as stream:
        next(stream.iter_bytes())  # then hang up mid-stream
    time.sleep(0.5)
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(15) == 0
    for conn in held:
        conn.close()
    proxy.output.wait_for("^$")  # the end of its output
    assert "Traceback" not in proxy.output.text and "CancelledError" not in proxy.output.text


# --- metrics ----------------------------------------------------------------------------------

METRICS_TOKEN = "metrics-token-0123456789abcdef"


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus's text format as {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_their_token_and_count_what_the_proxy_did(make_proxy: Any) -> None:
    port = free_port()
    proxy = make_proxy({"METRICS_TOKEN": METRICS_TOKEN, "METRICS_PORT": str(port)})
    assert raw(proxy, "GET", "/metrics").status_code == 401
    wrong = raw(proxy, "GET", "/metrics", headers={"authorization": "Bearer " + "x" * 30})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_metrics_token"
    key = proxy.new_key(sats=100)
    costs = []
    for _ in range(3):
        paid = raw(proxy, "POST", "/v1/chat/completions",
                   headers={"authorization": f"Bearer {key}"},
                   json={"model": "test/model", "messages": [{"role": "user", "content": "hi"}]})
        costs.append(int(paid.headers["x-routstr-cost-msats"]))
    with proxy.client(key).chat.completions.create(
            model="test/model", stream=True,
            messages=[{"role": "user", "content": "x y z"}]) as stream:
        for _ in stream:
            pass
    proxy.wait_settled()
    assert raw(proxy, "GET", "/v1/nowhere/" + "a" * 50).status_code in (401, 404)
    resp = raw(proxy, "GET", "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples = scrape(resp.text)
    chat = {"endpoint": "/v1/chat/completions", "model": "test/model", "status": "200"}
    assert value(samples, "routstr_requests_total", **chat) == 4
    assert not [k for k in samples if "nowhere" in str(k)]  # paths never become labels
    charged = value(samples, "routstr_charged_msat_total")
    assert charged > sum(costs) and charged == value(samples, "routstr_ledger_charged_msat")
    assert value(samples, "routstr_reserved_msat_total") == charged + value(
        samples, "routstr_released_msat_total")
    assert value(samples, "routstr_upstream_headers_seconds_count",
                 endpoint="/v1/chat/completions") == 4
    assert value(samples, "routstr_stream_ttfb_seconds_count",
                 endpoint="/v1/chat/completions") == 1
    assert value(samples, "routstr_rate_age_seconds") == 0  # a fixed rate
    assert value(samples, "routstr_liabilities_msat") == 0  # operator credit is not owed
    assert value(samples, "routstr_operator_credit_msat") == 100_000 - charged
    info = [k for k in samples if k[0] == "routstr_instance_info"]
    assert info and ("database", "sqlite") in info[0][1]
    local = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)  # loopback: no token
    assert local.status_code == 200
    assert value(scrape(local.text), "routstr_charged_msat_total") == charged
    assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=10).status_code == 404


def test_metrics_are_off_unless_asked_for(proxy: Proxy) -> None:
    off = raw(proxy, "GET", "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert off.status_code == 404 and off.json()["error"]["code"] == "not_found"


def test_the_sample_grafana_dashboard_reads_metrics_the_proxy_exports() -> None:
    from prometheus_client import generate_latest

    from routstr_addon.observe.metrics import Metrics

    from .conftest import ROOT

    dashboard = json.loads((ROOT / "docker" / "grafana" / "routstr-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"routstr_[a-z_]+", target["expr"])}
    metrics = Metrics()
    metrics.watch_books(lambda: {
        "holdings": [("http://mint", "sat", 1000)], "liabilities_msat": 0, "keys_msat": 0,
        "operator_credit_msat": 0, "pending_payouts_msat": 0, "margin_msat": 0,
        "ledger_charged_msat": 0, "ledger_requests": 0,
        "payouts": [("payout", "paid", 1, 1000)], "refunds": [("token", "done", 1, 1000)]})
    metrics.request("/v1/chat/completions", "m", "200")
    metrics.under_reserved.labels("m").inc()
    metrics.sweeps.labels("released").inc()
    metrics.mint_call("swap", "ok", 0.01)
    metrics.info.info({"version": "test"})
    for histogram in (metrics.upstream_headers, metrics.upstream_duration, metrics.stream_ttfb):
        histogram.labels("/v1/chat/completions").observe(0.1)
    exported = set(re.findall(r"^(routstr_[a-z_]+)", generate_latest(metrics.registry).decode(),
                              re.M))
    assert used and used <= exported, used - exported


def test_ready_is_503_without_a_btc_rate(make_proxy: Any) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    proxy = make_proxy({"BTC_USD_PRICE": "", "BTC_USD_SOURCES": f"kraken={nowhere}"})
    body = wait_ready(proxy, 503)
    assert body["checks"]["rate"] == {"ok": False, "age_s": None, "limit_s": 960.0,
                                      "detail": "no rate yet"}
    assert body["checks"]["upstream"]["ok"] and body["checks"]["ledger"]["ok"]


# --- the parts on their own -------------------------------------------------------------------


def test_a_flow_is_observed_once_and_text_values_are_quoted_when_they_must_be() -> None:
    import io

    from mitmproxy.test import tflow

    from routstr_addon.observe import flows
    from routstr_addon.observe.flows import FlowObserver, endpoint_label, known_endpoints
    from routstr_addon.proxy import forward

    assert flows.STATE == forward.STATE  # the observer reads the paid forward's state
    from routstr_addon.observe.metrics import Metrics
    from routstr_addon.observe.requestlog import format_line

    assert format_line({"a": "x y", "b": 'q"', "c": "", "d": None, "e": 3, "f": "plain"},
                       "text") == 'a="x y" b="q\\"" c="" e=3 f=plain'
    known = known_endpoints()
    assert endpoint_label("/v1/chat/completions", known) == "/v1/chat/completions"
    assert endpoint_label("/v1/models/gpt-4o", known) == "/v1/models/{id}"
    assert endpoint_label("/admin/api/keys/abc", known) == "/admin/api"
    assert endpoint_label("/wp-login.php", known) == "other"
    out = io.StringIO()
    metrics = Metrics()
    observer = FlowObserver("text", metrics, meter=None)  # type: ignore[arg-type]
    assert observer.log is not None
    observer.log.stream = out
    flow = tflow.tflow(resp=True)
    observer.requestheaders(flow)
    observer.response(flow)
    observer.error(flow)  # a failure after the answer: the same request, not a second one
    assert out.getvalue().count("\n") == 1 and "status=200" in out.getvalue()
    assert metrics.requests.labels("other", "", "200")._value.get() == 1
    failed = tflow.tflow(err=True)
    observer.requestheaders(failed)
    observer.error(failed)
    assert out.getvalue().splitlines()[1].endswith(" error=error")
    assert metrics.requests.labels("other", "", "failed")._value.get() == 1
    from routstr_addon.ledger import Settlement

    metrics.swept([Settlement("a", "k", 120, 500, 0), Settlement("b", "k", 0, 500, 0),
                   Settlement("c", "k", 0, 700, 0)])
    assert metrics.sweeps.labels("charged")._value.get() == 1
    assert metrics.sweeps.labels("released")._value.get() == 2


def test_paths_are_logged_without_what_may_be_a_secret() -> None:
    from routstr_addon.observe.requestlog import safe_path

    assert safe_path("/v1/chat/completions") == "/v1/chat/completions"
    invoice = "/v1/balance/lightning/invoice/Zq3x9v8QmT1wK2pL5nR7sY4uB6cD0eFgH1jK2lM3n/status"
    assert safe_path(invoice) == "/v1/balance/lightning/invoice/{secret}/status"
    assert safe_path("/v1/sk-0123/models") == "/v1/{secret}/models"
    assert safe_path("/cashuBo2FteCJodHRw") == "/{secret}"
