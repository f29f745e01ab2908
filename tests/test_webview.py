"""``routstr serve --web``: mitmweb shows who paid what for each flow (comment, metadata) and
no secret (keys, tokens, change, the upstream key) in anything it sends the browser, live or
later (flow list, contents, the flows download), while clients still get the real values."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ledger import Ledger, hash_key

from .conftest import BIN, MODELS, RATE, Output
from .ecash_user import UserWallet
from .upstream import TestUpstream

UPSTREAM_SECRET = "sk-upstream-SECRET-0123456789"
CHAT = {"model": "test/model", "messages": [{"role": "user", "content": "watch me"}]}
COMMENT = re.compile(r"^(key|x-cashu) ([0-9a-f]{16}) · test/model · reserved (\d+) msat · "
                     r"charged (\d+) msat$")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sse_cost_and_change(text: str) -> tuple[int, str | None]:
    cost = re.search(r"^: x-routstr-cost-msats (\d+)", text, re.M)
    change = re.search(r"^: x-cashu (\S+)", text, re.M)
    assert cost is not None, text
    return int(cost.group(1)), change.group(1) if change else None


def test_mitmweb_shows_who_paid_what_and_no_secret(
        tmp_path: Path, upstream: TestUpstream, mint: LocalMint, user: UserWallet) -> None:
    (tmp_path / "models.json").write_text(json.dumps(MODELS))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "UPSTREAM_BASE_URL": f"{upstream.url}/v1", "UPSTREAM_API_KEY": UPSTREAM_SECRET,
           "CASHU_MINTS": mint.url, "MODELS_PATH": str(tmp_path / "models.json"),
           "BTC_USD_PRICE": RATE, "DATA_DIR": str(tmp_path / "data")}
    (tmp_path / "data").mkdir()
    ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'routstr.sqlite'}")
    key, _ = ledger.create_key(1_000_000)
    ledger.close()
    port, web_port = _free_port(), _free_port()
    proc = subprocess.Popen([str(BIN / "routstr"), "serve", "--web", "--listen-port", str(port),
                             "--web-port", str(web_port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    messages: list[str] = []
    try:
        output = Output(proc)
        output.wait_for(rf"listening at \S+:{port}")
        token = output.wait_for(r"Web server listening at http://\S+\?token=(\w+)").group(1)
        web = f"http://127.0.0.1:{web_port}"
        ws = connect(f"ws://127.0.0.1:{web_port}/updates?token={token}")

        def listen() -> None:
            try:
                for message in ws:
                    messages.append(str(message))
            except Exception:  # closed at the end
                pass

        threading.Thread(target=listen, daemon=True).start()
        base = f"http://127.0.0.1:{port}/v1"
        bearer = {"authorization": f"Bearer {key}"}
        costs: dict[str, int] = {}
        with httpx.Client(timeout=30) as c:
            r = c.post(f"{base}/chat/completions", headers=bearer, json=CHAT)
            assert r.status_code == 200, r.text
            costs["key json"] = int(r.headers["x-routstr-cost-msats"])
            r = c.post(f"{base}/chat/completions", headers=bearer, json={**CHAT, "stream": True})
            costs["key stream"], _ = sse_cost_and_change(r.text)
            t1, t2, t3 = user.token(300), user.token(300), user.token(200)
            r = c.post(f"{base}/chat/completions", headers={"x-cashu": t1}, json=CHAT)
            assert r.status_code == 200, r.text
            costs["x-cashu json"], c1 = int(r.headers["x-routstr-cost-msats"]), r.headers["x-cashu"]
            r = c.post(f"{base}/chat/completions", headers={"x-cashu": t2},
                       json={**CHAT, "stream": True})
            costs["x-cashu stream"], c2 = sse_cost_and_change(r.text)
            assert c2 is not None
            created = c.post(f"{base}/balance/create", json={"initial_balance_token": t3}).json()
            k2 = created["api_key"]
            assert c.get(f"{base}/balance/info",
                         headers={"authorization": f"Bearer {k2}"}).json()["api_key"] == k2
            refund = c.post(f"{base}/balance/refund", headers={"authorization": f"Bearer {k2}"})
            assert refund.status_code == 200, refund.text
            r_token = refund.json()["token"]
            # Secrets in URLs are refused, and never shown either.
            t4 = user.token(100)
            r = c.post(f"{base}/balance/create", params={"initial_balance_token": t4})
            assert r.status_code == 400 and r.json()["error"]["code"] == "secret_in_url"
            r = c.post(f"{base}/chat/{key}", headers=bearer, json=CHAT)
            assert r.status_code == 404
        # The clients got the real change: it is worth something at the mint.
        assert user.receive(c1) > 0 and user.receive(c2) > 0 and user.receive(r_token) > 0

        secrets = [key, UPSTREAM_SECRET, t1, t2, t3, c1, c2, k2, r_token, t4]
        params = {"token": token}
        deadline = time.monotonic() + 10
        while True:  # flows are scrubbed once they are done
            flows: list[dict[str, Any]] = httpx.get(f"{web}/flows", params=params,
                                                    timeout=10).json()
            dump = httpx.get(f"{web}/flows/dump", params=params, timeout=10).content
            contents = [httpx.get(f"{web}/flows/{f['id']}/{part}/content.data", params=params,
                                  timeout=10).text
                        for f in flows for part in ("request", "response")]
            seen = json.dumps(flows) + dump.decode("latin-1") + "".join(contents)
            if not any(s in seen for s in secrets) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        ws.close()
        live = "".join(messages)
        assert "flows/add" in live and "flows/update" in live
        for i, secret in enumerate(secrets):
            assert secret not in seen, f"secret #{i} shown by mitmweb"
            assert secret not in live, f"secret #{i} sent live to mitmweb's page"
        assert "Bearer [redacted]" in json.dumps(flows)

        # Who paid what: the comment (and metadata) of each paid flow.
        paid = [f for f in flows if f["request"]["path"].endswith("/chat/completions")]
        assert len(paid) == 4
        for f, (label, cost) in zip(paid, costs.items(), strict=True):
            m = COMMENT.match(f["comment"])
            assert m is not None, f["comment"]
            assert m.group(1) == label.split()[0] and int(m.group(4)) == cost
            assert int(m.group(3)) >= cost
            if label.startswith("key"):
                assert m.group(2) == hash_key(key)[:16]
        assert b"key_id" in dump and b"charged_msat" in dump  # flow.metadata["routstr"]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(15)


@pytest.mark.parametrize(("name", "value", "shown"), [
    ("Authorization", "Bearer sk-abc", "Bearer [redacted]"),
    ("x-cashu", "cashuBxyz", "[redacted]"),
    ("content-type", "application/json", "application/json"),
])
def test_redact_header(name: str, value: str, shown: str) -> None:
    from routstr_addon.proxy.webview import redact_header

    assert redact_header(name, value) == shown
