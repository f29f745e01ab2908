"""``routstr serve``: the proxy in this process, with only the mitmproxy addons it needs.

mitmproxy walks every loaded addon for every event, and plain ``mitmdump`` loads about 35; a
reverse proxy needs five. ``--web`` runs mitmweb with the whole set instead, for watching flows.
With no provider (``UPSTREAM_BASE_URL``, ``PROVIDERS_PATH``, ``OPENAI_API_KEY``…) the proxy runs
the demo: an echo upstream in this process, a demo ledger and a funded demo key, all under
``DATA_DIR/demo``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routstr_addon import settings
from routstr_addon.dev.demo import DEMO_MODEL, EchoUpstream, run_in_thread
from routstr_addon.dev.localmint import LocalMint, die_with_parent, mint_token, port_or_free
from routstr_addon.ledger import Ledger, hash_key

from .common import err

ADDON_PATH = Path(__file__).resolve().parent.parent / "routstr_addon" / "addon.py"
DEMO_RATE = "100000"
DEMO_BALANCE_SATS = 10_000
DEMO_TOKEN_SATS = 1_000
DEMO_MINT_PORT = 3338
# Settings the demo replaces: whatever the operator configured for them is not used.
DEMO_OFF = {"NSEC": "", "HTTP_URL": "", "ONION_URL": "", "ONION_HOSTNAME_FILE": "",
            "PROVIDERS_REFRESH_INTERVAL": "0"}
DEMO_REPLACES = ("UPSTREAM_BASE_URL", "UPSTREAM_API_KEY", "DATA_DIR", "DATABASE_URL",
                 "MODELS_PATH", "CASHU_MINTS", "SWAP_UNTRUSTED_MINTS", "WALLET_MNEMONIC",
                 "RECEIVE_LN_ADDRESS", "PROVIDERS_PATH", "OLLAMA_BASE_URL",
                 *(variable for variable, *_ in settings.ENV_PROVIDERS), *DEMO_OFF)
KNOWN_SETTINGS = {s.env for s in settings.SETTINGS}


@dataclass(slots=True)
class Demo:
    """What the demo set up: where its upstream is and the key and token to try it with."""

    upstream_url: str
    key: str
    overrides: dict[str, str]
    mint_url: str = ""
    token: str = ""


def reverse_mode(base_url: str) -> str:
    upstream = settings.parse_upstream(base_url)
    assert upstream is not None
    return f"reverse:{upstream.origin}"


def demo_models(data_dir: Path) -> Path:
    """The example models plus the echo model, written where the demo reads them."""
    example = Path("models.example.json")
    if not example.is_file():
        example = ADDON_PATH.parent.parent / "models.example.json"
    entries: list[Any] = json.loads(example.read_text())["data"] if example.is_file() else []
    entries.insert(0, {
        "id": DEMO_MODEL, "name": "Demo: echo (no real model)", "context_length": 8192,
        "pricing": {"prompt": "0.000001", "completion": "0.000002", "request": "0"},
        "top_provider": {"context_length": 8192, "max_completion_tokens": 1024},
    })
    path = data_dir / "models.json"
    path.write_text(json.dumps({"data": entries}, indent=1))
    return path


def demo_folder(config_env: dict[str, str]) -> Path:
    data_dir = Path(config_env.get("DATA_DIR", "data")) / "demo"
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir


def demo_mnemonic(data_dir: Path) -> str:
    """The demo wallet's own mnemonic, kept in the demo folder: the demo never derives its
    (worthless) ecash from the operator's real WALLET_MNEMONIC or mnemonic file."""
    path = data_dir / "demo-mnemonic.txt"
    words = path.read_text().strip() if path.is_file() else ""
    if not words:
        from mnemonic import Mnemonic

        words = Mnemonic("english").generate(128)
        path.write_text(words + "\n")
        path.chmod(0o600)
    return words


def prepare_demo(config_env: dict[str, str], upstream_url: str, mint_url: str = "") -> Demo:
    """Demo settings (own ledger, wallet and data folder, fixed demo rate, the local mint, no
    payouts, no upstream key) and a funded demo key, kept across runs, and a fresh demo token
    from the local mint."""
    data_dir = demo_folder(config_env)
    overrides = {
        "UPSTREAM_BASE_URL": f"{upstream_url}/v1",
        "UPSTREAM_API_KEY": "",
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{data_dir / 'routstr.sqlite'}",
        "MODELS_PATH": str(demo_models(data_dir)),
        "BTC_USD_PRICE": config_env.get("BTC_USD_PRICE") or DEMO_RATE,
        "NAME": "Routstr DEMO (echo model, no real money)",
        "CASHU_MINTS": mint_url,
        "SWAP_UNTRUSTED_MINTS": "false",
        "WALLET_MNEMONIC": demo_mnemonic(data_dir),
        "RECEIVE_LN_ADDRESS": "",
        # never announced on Nostr under the operator's identity, nor asking relays
        **{name: value for name, value in DEMO_OFF.items() if name in KNOWN_SETTINGS},
    }
    ledger = Ledger(overrides["DATABASE_URL"])
    try:
        key_file = data_dir / "demo-key.txt"
        key = key_file.read_text().strip() if key_file.is_file() else ""
        state = ledger.key(hash_key(key)) if key else None
        if state is None:
            key, state = ledger.create_key(DEMO_BALANCE_SATS * 1000, label="demo",
                                           note="demo funding")
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
        elif state.available_msat < 1000 * DEMO_BALANCE_SATS // 10:
            ledger.credit(state.key_hash, DEMO_BALANCE_SATS * 1000, note="demo top-up")
    finally:
        ledger.close()
    token = asyncio.run(mint_token(mint_url, DEMO_TOKEN_SATS)) if mint_url else ""
    return Demo(upstream_url, key, overrides, mint_url, token)


RULE = "=" * 82
THIN = "-" * 82


def demo_banner(demo: Demo, host: str, port: int, asked: bool = False) -> str:
    """What the demo prints: what it is, and commands to paste as they are."""
    base = f"http://{host}:{port}"
    why = ("(routstr demo, whatever is configured): this proxy" if asked else
           "no upstream is configured (UPSTREAM_BASE_URL), so this proxy")
    leave = ("Run `routstr serve` with UPSTREAM_BASE_URL set for the real proxy." if asked else
             "Configure a real upstream in .env (see .env.example) to leave the demo.")
    return f"""
{RULE}
  ROUTSTR DEMO: {why}
  forwards to a built-in ECHO model and bills a demo key in a demo ledger at a
  fixed demo rate. No real model answers and no real money moves.
{RULE}
  Proxy:     {base}/v1
  Demo key:  {demo.key}

  Try it with curl:

    curl {base}/v1/chat/completions \\
      -H "Authorization: Bearer {demo.key}" \\
      -H "Content-Type: application/json" \\
      -d '{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

    curl {base}/v1/balance/info -H "Authorization: Bearer {demo.key}"

  or with the OpenAI Python SDK (pip install openai):

from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{demo.key}")
reply = client.chat.completions.create(
    model="{DEMO_MODEL}", messages=[{{"role": "user", "content": "Hello!"}}])
print(reply.choices[0].message.content)

{_token_lines(demo, base)}  {leave}
{RULE}
"""


def _token_lines(demo: Demo, base: str) -> str:
    if not demo.token:
        return ""
    return f"""{THIN}
  Demo mint: {demo.mint_url} (FakeWallet: its ecash is free and worthless)
  Demo token ({DEMO_TOKEN_SATS} sats): {demo.token}

  Pay one request with the token and get the change back in the x-cashu header:

    curl -i {base}/v1/chat/completions \\
      -H "X-Cashu: {demo.token}" \\
      -H "Content-Type: application/json" \\
      -d '{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", "content": "Hi"}}]}}'

  or use it as the API key: -H "Authorization: Bearer <the token>" (a token is spent once:
  pay with it by x-cashu or use it as a key, not both).
{THIN}
"""


async def run_proxy(mode: str, host: str, port: int, overrides: dict[str, Any],
                    quiet: bool = False) -> int:
    """Run the proxy with the minimal addon set until SIGINT/SIGTERM."""
    from mitmproxy import hooks, master, options
    from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig

    from routstr_addon.addon import Routstr

    logging.getLogger().setLevel(logging.INFO)  # mitmproxy's handlers filter by verbosity
    opts = options.Options(mode=[mode], listen_host=host, listen_port=port)
    m = master.Master(opts, with_termlog=not quiet)
    m.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(),
                 tlsconfig.TlsConfig(), errorcheck.ErrorCheck(), Routstr())
    m.options.update(**overrides)
    # What mitmdump's start-up does: every addon configures itself from all options once.
    m.addons.trigger(hooks.ConfigureHook(set(m.options.keys())))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    await m.run()
    return 0


def option_overrides(env_overrides: dict[str, str]) -> dict[str, Any]:
    """Demo settings (written as env names) as option values."""
    by_env = {s.env: s for s in settings.SETTINGS}
    return {by_env[k].option: settings.parse_value(by_env[k], v) for k, v in env_overrides.items()}


def serve(host: str, port: int, web: bool, quiet: bool = False, web_port: int = 8081,
          demo: bool = False) -> int:
    """Run the proxy; the demo when no upstream is configured, or when ``demo`` asks for it
    whatever is configured."""
    # SIGTERM ends the process through ``finally`` blocks (the demo mint is stopped), as
    # Ctrl-C does; while the proxy runs, its own handler shuts it down cleanly instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    env = settings.environment()
    if demo:  # what the demo replaces need not be valid; the rest is checked as usual
        env = {k: v for k, v in env.items() if k not in DEMO_REPLACES or k == "DATA_DIR"}
    config = settings.load_config(env)  # a bad setting stops here with its name
    # A provider to forward to (UPSTREAM_BASE_URL, PROVIDERS_PATH, OPENAI_API_KEY…): serve;
    # the reverse mode's target is the first one (each request is sent to its own).
    first = next((p for p in config.providers if p.upstream is not None), None)
    if first is not None and not demo:
        overrides: dict[str, str] = {}
        mode = reverse_mode(first.base_url)
        return _run(mode, host, port, overrides, web, quiet, web_port)
    mint = LocalMint(demo_folder(env) / "mint", port=port_or_free(DEMO_MINT_PORT))
    try:
        with err.status("starting the demo mint (FakeWallet)…"):
            mint.start()
    except RuntimeError as e:  # the demo still runs, with keys only
        print(f"demo mint did not start ({e}); continuing without ecash", file=sys.stderr)
        mint.stop()
        mint_url = ""
    else:
        mint_url = mint.url
    try:
        with run_in_thread(EchoUpstream()) as upstream:
            with err.status("funding the demo key and minting a demo token…"):
                prepared = prepare_demo(env, upstream.url, mint_url)
            print(demo_banner(prepared, host, port, asked=demo), flush=True)
            return _run(reverse_mode(upstream.url), host, port, prepared.overrides, web, quiet,
                        web_port)
    finally:
        mint.stop()


def _run(mode: str, host: str, port: int, env_overrides: dict[str, str], web: bool,
         quiet: bool, web_port: int = 8081) -> int:
    if not web:
        return asyncio.run(run_proxy(mode, host, port, option_overrides(env_overrides), quiet))
    mitmweb = shutil.which("mitmweb") or str(Path(sys.executable).parent / "mitmweb")
    cmd = [mitmweb, "--mode", mode, "--listen-host", host, "--listen-port", str(port),
           "--web-port", str(web_port), "--set", "web_open_browser=false", "-s", str(ADDON_PATH)]
    env = {**os.environ, **env_overrides}
    return subprocess.call(cmd, env=env, preexec_fn=die_with_parent)
