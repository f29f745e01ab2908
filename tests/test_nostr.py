"""Nostr discovery against a real relay process (nostr-relay, on loopback, its own database):
the listing a proxy announces is signed (checked here with an independent Schnorr verifier),
carries the original Routstr's tags, and ``/v1/providers`` finds the proxies announced there
(one only over "Tor", through a SOCKS5 proxy) and drops the one whose ``/v1/info`` is dead."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import nostr_sdk as ns
import pytest
from coincurve import PublicKeyXOnly
from typer.testing import CliRunner

from cli.main import app
from routstr_addon import __version__
from routstr_addon.dev.localmint import LocalMint
from routstr_addon.discovery.nostr import (
    LISTING_KIND,
    latest,
    listing_event,
    parse_listing,
    publish,
)
from routstr_addon.settings import SettingError, load_config

from .conftest import BIN, Output, Proxy, start_proxy
from .upstream import TestUpstream

ONION_HOST = "routstrtestb" + "a" * 44 + ".onion"  # 56 characters, as a v3 onion address


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[str]:
    """A nostr-relay process on 127.0.0.1 with a fresh SQLite database."""
    port = free_port()
    folder = tmp_path / "relay"
    folder.mkdir()
    (folder / "config.yaml").write_text(f"""
DEBUG: false
storage:
  sqlalchemy.url: sqlite+aiosqlite:///{folder}/relay.sqlite3
  validators:
    - nostr_relay.validators.is_signed
gunicorn:
  bind: 127.0.0.1:{port}
  workers: 1
  loglevel: info
authentication:
  enabled: false
""")
    env = {"PATH": os.environ["PATH"], "HOME": str(folder), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(BIN / "nostr-relay"), "-c", str(folder / "config.yaml"),
                             "serve"], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = Output(proc)
        output.wait_for(r"Booting worker", timeout=60)
        url = f"http://127.0.0.1:{port}/"
        for _ in range(100):  # the worker takes a moment to accept connections
            try:
                if httpx.get(url, headers={"accept": "application/nostr+json"},
                             timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield f"ws://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


def relay_events(relay_url: str, kind: int = LISTING_KIND) -> list[dict[str, Any]]:
    """What the relay holds, read with a client of our own."""
    async def fetch() -> list[dict[str, Any]]:
        client = ns.Client()
        await client.add_relay(ns.RelayUrl.parse(relay_url))
        await client.connect(timedelta(seconds=5))
        events = await client.fetch_events(
            ns.ReqTarget.auto([ns.Filter().kind(ns.Kind(kind))]), timedelta(seconds=5))
        await client.shutdown()
        return [json.loads(e.as_json()) for e in events]

    return asyncio.run(fetch())


def schnorr_valid(event: dict[str, Any]) -> bool:
    """NIP-01 by hand: the id is the hash of the serialized event, the sig a BIP-340 signature
    of it by the pubkey (coincurve/libsecp256k1, not nostr-sdk)."""
    serialized = json.dumps([0, event["pubkey"], event["created_at"], event["kind"],
                             event["tags"], event["content"]], separators=(",", ":"),
                            ensure_ascii=False)
    digest = hashlib.sha256(serialized.encode()).digest()
    if digest.hex() != event["id"]:
        return False
    key = PublicKeyXOnly(bytes.fromhex(event["pubkey"]))
    return bool(key.verify(bytes.fromhex(event["sig"]), digest))


def tags(event: dict[str, Any], name: str) -> list[str]:
    return [t[1] for t in event["tags"] if t[0] == name]


# --- settings ---------------------------------------------------------------------------------


def test_nostr_settings_are_checked_at_start() -> None:
    keys = ns.Keys.generate()
    for form in (keys.secret_key().to_bech32(), keys.secret_key().to_hex()):
        config = load_config({"NSEC": form, "ONION_URL": "abc.onion"})
        assert config.nostr.pubkey == keys.public_key().to_hex()
        assert config.nostr.npub == keys.public_key().to_bech32()
        assert config.nostr.onion_url == "http://abc.onion"
    assert load_config({}).nostr.relays == ("wss://relay.damus.io", "wss://nos.lol",
                                            "wss://relay.routstr.com")
    for name, value in (("NSEC", "nsec1notakey"), ("RELAYS", "https://relay.example.com"),
                        ("HTTP_URL", "ftp://x"), ("TOR_PROXY_URL", "http://127.0.0.1:9050"),
                        ("PROVIDERS_REFRESH_INTERVAL", "3")):
        with pytest.raises(SettingError, match=name):
            load_config({name: value})


def test_listings_are_parsed_and_the_newest_per_provider_kept() -> None:
    a, b = ns.Keys.generate(), ns.Keys.generate()

    def event(keys: ns.Keys, url: str, at: int) -> dict[str, Any]:
        built = ns.EventBuilder(ns.Kind(LISTING_KIND), json.dumps({"name": url}))
        built = built.tags([ns.Tag.identifier("same-d"), ns.Tag.parse(["u", url]),
                            ns.Tag.parse(["mint", "https://mint.example"])])
        built = built.custom_created_at(ns.Timestamp.from_secs(at))
        data: dict[str, Any] = json.loads(built.finalize(keys).as_json())
        return data

    events = [event(a, "https://old.example", 1000), event(a, "https://new.example", 2000),
              event(b, "https://b.example", 1500),
              {**event(b, "https://x.example", 1), "tags": [["u", "https://no-d.example"]]}]
    found = latest(events)
    assert [(p.pubkey, p.endpoint_urls, p.name) for p in found] == [
        (a.public_key().to_hex(), ["https://new.example"], "https://new.example"),
        (b.public_key().to_hex(), ["https://b.example"], "https://b.example")]
    assert found[0].mint_urls == ["https://mint.example"]
    assert parse_listing({"kind": 1, "tags": [["d", "x"], ["u", "https://y"]]}) is None


# --- announcing -------------------------------------------------------------------------------


def test_the_announcement_is_published_signed_and_parsed_back(
        relay: str, upstream: TestUpstream, mint: LocalMint, tmp_path: Path) -> None:
    keys = ns.Keys.generate()
    hostname = tmp_path / "hidden_service" / "hostname"
    hostname.parent.mkdir()
    hostname.write_text(ONION_HOST + "\n")  # as tor writes it
    proxy = start_proxy(tmp_path / "p", upstream.url, {
        "UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mint.url,
        "NSEC": keys.secret_key().to_bech32(), "RELAYS": relay,
        "HTTP_URL": "https://proxy.example.com/", "ONION_HOSTNAME_FILE": str(hostname),
        "NAME": "Announced proxy", "DESCRIPTION": "Paid per request"})
    try:
        proxy.output.wait_for(r"nostr: announced .* to 1 of 1 relay")
        info = httpx.get(f"{proxy.url}/v1/info", timeout=10).json()
    finally:
        proxy.stop()
    assert "NSEC" not in proxy.output.text and keys.secret_key().to_hex() not in proxy.output.text
    assert info["http_url"] == "https://proxy.example.com"
    assert info["onion_url"] == f"http://{ONION_HOST}"
    assert info["npub"] == keys.public_key().to_bech32()

    [event] = relay_events(relay)
    assert schnorr_valid(event)
    assert ns.Event.from_json(json.dumps(event)).verify()
    pubkey = keys.public_key().to_hex()
    assert event["pubkey"] == pubkey and event["kind"] == 38421
    assert tags(event, "d") == [pubkey[:12]]
    assert tags(event, "u") == ["https://proxy.example.com", f"http://{ONION_HOST}"]
    assert tags(event, "mint") == [mint.url]
    assert tags(event, "version") == [__version__]
    assert json.loads(event["content"]) == {"name": "Announced proxy", "about": "Paid per request"}
    # Tampering breaks the signature.
    assert not schnorr_valid({**event, "content": json.dumps({"name": "Evil", "about": ""})})

    parsed = parse_listing(event)
    assert parsed is not None
    assert (parsed.id, parsed.name, parsed.description, parsed.version) == (
        pubkey[:12], "Announced proxy", "Paid per request", __version__)


def test_private_urls_are_not_announced_to_public_relays(tmp_path: Path) -> None:
    from routstr_addon.discovery.nostr import announce

    keys = ns.Keys.generate()
    config = load_config({"NSEC": keys.secret_key().to_hex(), "HTTP_URL": "http://127.0.0.1:8000",
                          "RELAYS": "wss://relay.example.invalid",
                          "DATA_DIR": str(tmp_path)})
    assert asyncio.run(announce(config)) is None  # nothing left to announce: no relay asked


# --- discovering ------------------------------------------------------------------------------


class Socks5:
    """A SOCKS5 proxy standing in for Tor: every .onion host leads to one local port."""

    def __init__(self, onion_target: int) -> None:
        self.target = onion_target
        self.port = free_port()
        self.asked: list[str] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, n = await reader.readexactly(2)
            await reader.readexactly(n)
            writer.write(b"\x05\x00")  # no authentication
            _, _, _, atyp = await reader.readexactly(4)
            if atyp != 3:  # only names: Tor resolves them, the client must not
                writer.write(b"\x05\x08\x00\x01" + bytes(6))
                return
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
            await reader.readexactly(2)
            self.asked.append(host)
            if not host.endswith(".onion"):
                writer.write(b"\x05\x04\x00\x01" + bytes(6))
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            writer.write(b"\x05\x00\x00\x01" + bytes(6))

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                                 return_exceptions=True)
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_providers_lists_the_announced_proxies_that_answer(
        relay: str, upstream: TestUpstream, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a_keys, b_keys, dead_keys = ns.Keys.generate(), ns.Keys.generate(), ns.Keys.generate()
    a_port, b_port, dead_port = free_port(), free_port(), free_port()
    socks = Socks5(onion_target=b_port)
    hostname = tmp_path / "hs" / "hostname"
    hostname.parent.mkdir()
    hostname.write_text(ONION_HOST + "\n")
    common = {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "RELAYS": relay,
              "TOR_PROXY_URL": f"socks5h://127.0.0.1:{socks.port}"}
    started: list[Proxy] = []
    try:
        # A: reached over plain HTTP. B: only over its onion address (through "Tor").
        started.append(start_proxy(tmp_path / "a", upstream.url, {
            **common, "NSEC": a_keys.secret_key().to_bech32(), "NAME": "Provider A",
            "HTTP_URL": f"http://127.0.0.1:{a_port}"}, args=("-p", str(a_port))))
        started.append(start_proxy(tmp_path / "b", upstream.url, {
            **common, "NSEC": b_keys.secret_key().to_bech32(), "NAME": "Provider B",
            "ONION_HOSTNAME_FILE": str(hostname)}, args=("-p", str(b_port))))
        a = started[0]
        for p in started:
            p.output.wait_for(r"nostr: announced .* to 1 of 1 relay")
        # A third listing whose URL does not answer.
        dead = listing_event(dead_keys, [f"http://127.0.0.1:{dead_port}"], [], "Dead", "gone")
        assert asyncio.run(publish(dead, [relay])) == [relay]
        assert len(relay_events(relay)) == 3

        resp = httpx.get(f"{a.url}/v1/providers", timeout=60)
        assert resp.status_code == 200, resp.text
        found = {p["name"]: p for p in resp.json()["providers"]}
        assert set(found) == {"Provider A", "Provider B"}
        pa, pb = found["Provider A"], found["Provider B"]
        assert pa["pubkey"] == a_keys.public_key().to_hex()
        assert pa["npub"] == a_keys.public_key().to_bech32()
        assert pa["id"] == pa["pubkey"][:12] and pa["version"] == __version__
        assert pa["endpoint_url"] == f"http://127.0.0.1:{a_port}"
        assert pa["info"]["name"] == "Provider A" and pa["info"]["npub"] == pa["npub"]
        assert pb["endpoint_urls"] == [f"http://{ONION_HOST}"]
        assert pb["endpoint_url"] == f"http://{ONION_HOST}"
        assert pb["info"]["name"] == "Provider B"
        assert pb["info"]["onion_url"] == f"http://{ONION_HOST}"
        assert ONION_HOST in socks.asked  # the onion name went to the SOCKS proxy, unresolved

        # Cached: a second answer does not ask the relays again; filters as the original's.
        listed = httpx.get(f"{a.url}/v1/providers",
                           params={"pubkey": pb["pubkey"], "include_json": "true"},
                           timeout=10).json()["providers"]
        assert [(p["provider"]["name"], p["health"]["json"]["name"]) for p in listed] == [
            ("Provider B", "Provider B")]

        # The CLI reads the relays directly, with the same answer.
        monkeypatch.chdir(tmp_path)
        for name, value in common.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("DATA_DIR", str(tmp_path / "cli"))
        result = CliRunner().invoke(app, ["providers", "--json"])
        assert result.exit_code == 0, result.output
        assert {p["name"] for p in json.loads(result.stdout)["providers"]} == set(found)
        table = CliRunner().invoke(app, ["providers"])
        assert table.exit_code == 0 and "Provider B" in table.stdout
    finally:
        for p in started:
            p.stop()
        socks.stop()


def test_providers_can_be_turned_off(upstream: TestUpstream, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, upstream.url, {"UPSTREAM_BASE_URL": f"{upstream.url}/v1",
                                                 "PROVIDERS_REFRESH_INTERVAL": "0"})
    try:
        resp = httpx.get(f"{proxy.url}/v1/providers", timeout=10)
        assert resp.status_code == 404 and "PROVIDERS_REFRESH_INTERVAL" in resp.text
    finally:
        proxy.stop()
