"""``routstr providers``: the Routstr providers listed on the Nostr relays that answer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .common import JsonOpt, console, err, fail, load_config

__all__ = ["providers"]


def providers(
    relay: Annotated[list[str] | None, typer.Option(
        "--relay", metavar="URL",
        help="A relay to ask (repeat for several). Default: RELAYS.")] = None,
    pubkey: Annotated[str | None, typer.Option(help="Only this operator (hex pubkey).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Routstr providers on the Nostr relays (RELAYS) that answer, as GET /v1/providers.

    Reads the relays directly, keeps each provider's newest listing and asks its /v1/info
    (.onion ones through TOR_PROXY_URL); those that do not answer are left out."""
    from routstr_addon.discovery import nostr  # nostr-sdk is loaded only for this command

    settings = load_config().nostr
    if relay:
        bad = [r for r in relay if not r.startswith(("ws://", "wss://"))]
        if bad:
            raise fail(f"--relay: expected ws:// or wss:// URLs, got {bad[0]!r}", 2)
        settings = dataclasses.replace(settings, relays=tuple(relay))
    if not settings.relays:
        raise fail("no relays (set RELAYS or give --relay)", 2)
    found = asyncio.run(nostr.discover(settings, pubkey=pubkey))
    if as_json:
        print(json.dumps({"providers": [p.as_json() for p in found]}))
        return
    if not found:
        err.print(f"no provider on {len(settings.relays)} relay(s) answered")
        return
    table = Table(title=f"{len(found)} provider(s) answering")
    for col in ("name", "url", "mints", "version", "pubkey"):
        table.add_column(col)
    for p in found:
        table.add_row(escape(p.name), escape(p.endpoint_url or ""), str(len(p.mint_urls)),
                      escape(p.version or ""), nostr.npub(p.pubkey)[:20] + "…")
    console.print(table)
