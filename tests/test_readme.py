"""The README's commands, run as written: the Quick start (``./run.sh`` serving the demo, the
``curl`` and OpenAI SDK snippets, ``example.py`` paying with the demo token, ``./run.sh test``),
the HTTP API examples against that demo, and the TLS command with mitmproxy's own certs.

Only placeholders are filled in (``sk-…`` and ``cashuB…`` with the demo's key and tokens, the
port if 8000 is taken), so the README cannot drift from what works."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from routstr_addon.dev.localmint import mint_token

from .conftest import BIN, ROOT, Output
from .upstream import TestUpstream

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, trailing comments dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [re.sub(r"\s{2,}#.*$", "", line).strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Demo:
    port: int
    key: str
    token: str
    mint_url: str
    env: dict[str, str]

    def fill(self, command: str, token: str | None = None, key: str | None = None) -> str:
        """The README's placeholders replaced with the demo's values."""
        command = command.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
        command = command.replace("sk-…", key or self.key)
        return command.replace("cashuB…", token or self.token)

    def fresh_token(self, sats: int = 200) -> str:
        return asyncio.run(mint_token(self.mint_url, sats))

    def sh(self, command: str, timeout: float = 60) -> str:
        result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result.stdout


def environment(tmp: Path) -> dict[str, str]:
    """A clean environment: the demo, whatever a developer's .env says; data in ``tmp``;
    relays that answer nothing (no public network for /v1/providers)."""
    certificates = {k: v for k, v in os.environ.items()
                    if k.startswith(("SSL_", "UV_", "PIP_")) or k.endswith("_CA_BUNDLE")}
    return {**certificates, "PATH": f"{BIN}:{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", str(tmp)), "PYTHONUNBUFFERED": "1",
            "UPSTREAM_BASE_URL": "", "DATA_DIR": str(tmp / "data"),
            "RELAYS": f"ws://127.0.0.1:{free_port()}"}


def test_the_quick_start_begins_with_the_two_commands() -> None:
    first = commands(blocks(section("Quick start"), "sh")[0])
    assert first == ["./run.sh", "./run.sh test"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """``./run.sh``, as the Quick start says: it serves the demo and prints its key and token."""
    tmp = tmp_path_factory.mktemp("readme")
    env = environment(tmp)
    cmd = ["./run.sh"] if port_free(8000) else ["./run.sh", "--listen-port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = Output(proc)
        port = int(output.wait_for(r"listening at \S+:(\d+)", timeout=120).group(1))
        key = output.wait_for(r"Demo key:\s+(sk-[0-9a-f]{64})").group(1)
        token = output.wait_for(r"Demo token \(\d+ sats\): (cashuB\S+)").group(1)
        mint_url = output.wait_for(r"Demo mint: (\S+)").group(1)
        yield Demo(port, key, token, mint_url, env)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    assert proc.returncode == 0, output.text


def test_quick_start_snippets_run_against_the_demo(demo: Demo) -> None:
    quick = section("Quick start")
    _, curl_block, example_block = blocks(quick, "sh")
    [curl] = commands(curl_block)
    answer = json.loads(demo.sh(demo.fill(curl)))
    assert "[demo echo" in answer["choices"][0]["message"]["content"]

    [snippet] = blocks(quick, "python")
    printed = subprocess.run([sys.executable, "-c", demo.fill(snippet)], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("[demo echo, no real model] Hi")

    [example] = commands(example_block)
    out = demo.sh(demo.fill(example), timeout=120)
    assert len(re.findall(r"cost \d+ msat · change \d+ sat", out)) == 3
    assert re.search(r"remaining \d+ sat in this token \(keep it\):\ncashuB", out)


def test_http_api_examples_run_against_the_demo(demo: Demo) -> None:
    [block] = [b for b in blocks(section("HTTP API"), "sh") if "/v1/info" in b]
    created_key: str | None = None
    seen: set[str] = set()
    for command in commands(block):
        out = demo.sh(demo.fill(command, token=demo.fresh_token(), key=created_key))
        answer = json.loads(out)
        path = re.search(r"/v1/\S+", command)
        assert path is not None
        seen.add(path.group(0))
        if "/balance/create" in command:
            created_key = answer["api_key"]
            assert answer["balance"] > 0
        if "/balance/refund" in command:
            assert answer["token"].startswith("cashu") and answer["msats"] > 0
        if command.endswith("/v1/info"):
            assert "DEMO" in answer["name"]
        if "/v1/providers" in command:  # the demo asks no relay
            assert answer["error"]["code"] == "not_found"
            assert "PROVIDERS_REFRESH_INTERVAL=0" in answer["error"]["message"]
    assert {"/v1/info", "/v1/models/demo-echo", "/v1/balance/info", "/v1/balance/create",
            "/v1/balance/refund", "/v1/providers"} <= seen


@pytest.mark.timeout(900)
def test_run_sh_test_lints_type_checks_and_tests(tmp_path: Path) -> None:
    """``./run.sh test``: ruff, mypy and pytest; pytest on one quick file here (the whole suite
    is what is running this test)."""
    result = subprocess.run(["./run.sh", "test", "-q", "-x", "tests/test_docs.py"], cwd=ROOT,
                            env=environment(tmp_path), capture_output=True, text=True,
                            timeout=880)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "passed" in result.stdout


def test_tls_with_mitmproxys_own_certs(tmp_path: Path, upstream: TestUpstream) -> None:
    """The "Running behind TLS" mitmdump command, with a self-signed certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "tls.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()) + pem)
    (tmp_path / "ca.pem").write_bytes(pem)

    [block] = [b for b in blocks(section("Running behind TLS"), "sh") if "--certs" in b]
    [command] = commands(block)
    port = free_port()
    command = (command.replace("reverse:https://api.openai.com", f"reverse:{upstream.url}")
               .replace("--listen-port 443", f"--listen-port {port} --listen-host 127.0.0.1")
               .replace("/etc/routstr/tls.pem", str(tmp_path / "tls.pem"))
               .replace("routstr_addon/addon.py", str(ROOT / "routstr_addon" / "addon.py")))
    env = {"PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "UPSTREAM_BASE_URL": f"{upstream.url}/v1", "DATA_DIR": str(tmp_path / "data"),
           "BTC_USD_PRICE": "90000"}
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        Output(proc).wait_for(rf"listening at \S+:{port}")
        https = httpx.get(f"https://localhost:{port}/v1/info", verify=str(tmp_path / "ca.pem"),
                          timeout=10)
        assert https.status_code == 200 and https.json()["name"] == "Routstr Proxy"
        plain = httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=10)
        assert plain.status_code == 200  # the same port answers both
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
