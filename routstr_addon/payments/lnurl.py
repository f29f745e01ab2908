"""Paying a Lightning address or an LNURL: LNURL-pay (LUD-06) in every form users write it.

``user@domain`` (LUD-16) → ``https://domain/.well-known/lnurlp/user``; a bech32 ``lnurl1…``
(LUD-01, decoded with the ``bech32`` library) or ``lnurlp://…`` (LUD-17) → the URL it holds; a
plain ``https://`` URL as is; each optionally prefixed ``lightning:``. That URL gives a pay
request with a callback and the amounts it takes → ``GET callback?amount=<msat>`` → a bolt11
invoice. The invoice is decoded with the ``bolt11`` library and must be for exactly the amount
asked (and, when it carries one, for the pay request's description hash) before anything is
paid. Which hosts may be fetched is the client's business (``netguard``).
"""

from __future__ import annotations

import hashlib
import ipaddress
from urllib.parse import urlsplit

import httpx

__all__ = ["LnAddressError", "check_refund_address", "invoice_for", "pay_url", "well_known_url"]


class LnAddressError(Exception):
    """The Lightning address could not give a payable invoice for the amount."""


def _plain_http_allowed(host: str) -> bool:
    """LUD-16 says https; .onion hosts, and loopback or private-network addresses, are reached
    over plain http (for users' addresses, only with ALLOW_PRIVATE_LN_ADDRESSES: the client's
    guard refuses both plain http and those addresses otherwise)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.endswith(".onion") or name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_private


def well_known_url(address: str) -> str:
    user, _, domain = address.strip().partition("@")
    if not user or not domain:
        raise LnAddressError(f"not a Lightning address: {address!r}")
    scheme = "http" if _plain_http_allowed(domain) else "https"
    return f"{scheme}://{domain}/.well-known/lnurlp/{user}"


def _decode_bech32(text: str) -> str:
    from bech32 import bech32_decode, convertbits

    hrp, data = bech32_decode(text.lower())
    decoded = convertbits(data, 5, 8, False) if hrp == "lnurl" and data is not None else None
    if decoded is None:
        raise LnAddressError("not a valid bech32 LNURL")
    try:
        return bytes(decoded).decode()
    except UnicodeDecodeError:
        raise LnAddressError("the LNURL does not hold a URL") from None


def pay_url(target: str) -> str:
    """The LNURL-pay URL of a Lightning address, a bech32 LNURL, an ``lnurlp://`` URL or an
    https URL (each may start with ``lightning:``)."""
    text = target.strip()
    if text.lower().startswith("lightning:"):
        text = text[len("lightning:"):]
    if text.lower().startswith("lnurl1"):
        url = _decode_bech32(text)
    elif text.lower().startswith("lnurlp://"):
        rest = text[len("lnurlp://"):]
        host = rest.split("/", 1)[0].rsplit(":", 1)[0]
        url = f"{'http' if host.endswith('.onion') else 'https'}://{rest}"
    elif "@" in text and "/" not in text:
        return well_known_url(text)
    else:
        url = text
    parts = urlsplit(url)
    if not parts.hostname or parts.scheme not in ("https", "http") or " " in url:
        raise LnAddressError(f"not a Lightning address or LNURL: {target[:80]!r}")
    if parts.scheme == "http" and not _plain_http_allowed(parts.netloc):
        raise LnAddressError(f"an LNURL must use https: {url[:80]}")
    return url


def check_refund_address(target: str) -> str:
    """A refund address as given, if it is one of the forms ``pay_url`` reads; else
    LnAddressError. Nothing is fetched."""
    text = target.strip()
    if len(text) > 2048:
        raise LnAddressError("the refund address is too long")
    pay_url(text)
    return text


async def invoice_for(address: str, amount_msat: int, client: httpx.AsyncClient,
                      comment: str | None = None) -> str:
    """A bolt11 invoice for exactly ``amount_msat`` from the LNURL-pay service of a Lightning
    address or LNURL (any form ``pay_url`` reads)."""
    try:
        resp = await client.get(pay_url(address))
        resp.raise_for_status()
        pay = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        raise LnAddressError(f"{address} did not answer a pay request: {e}") from None
    if not isinstance(pay, dict) or pay.get("tag") != "payRequest" or "callback" not in pay:
        reason = pay.get("reason") if isinstance(pay, dict) else None
        raise LnAddressError(f"{address} is not a Lightning address ({reason or 'no payRequest'})")
    low, high = int(pay.get("minSendable", 1)), int(pay.get("maxSendable", 0))
    if not low <= amount_msat <= high:
        raise LnAddressError(f"{address} takes {low // 1000}–{high // 1000} sats, not "
                             f"{amount_msat // 1000}")
    callback = str(pay["callback"])
    if urlsplit(callback).scheme not in ("https", "http") or (
            urlsplit(callback).scheme == "http"
            and not _plain_http_allowed(urlsplit(callback).netloc)):
        raise LnAddressError(f"{address} gave an insecure callback: {callback}")
    params: dict[str, str | int] = {"amount": amount_msat}
    if comment and int(pay.get("commentAllowed", 0)) >= len(comment):
        params["comment"] = comment
    try:
        resp = await client.get(callback, params=params)
        resp.raise_for_status()
        answer = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        raise LnAddressError(f"{address} did not give an invoice: {e}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("pr"), str):
        reason = answer.get("reason") if isinstance(answer, dict) else None
        raise LnAddressError(f"{address} refused to give an invoice: {reason}")
    invoice: str = answer["pr"]
    check_invoice(invoice, amount_msat, pay.get("metadata"))
    return invoice


def check_invoice(invoice: str, amount_msat: int, metadata: object = None) -> None:
    """The invoice is for exactly ``amount_msat`` and, if it commits to a description hash,
    to the pay request's metadata."""
    import bolt11

    try:
        decoded = bolt11.decode(invoice)
    except Exception as e:
        raise LnAddressError(f"the invoice does not decode: {e}") from None
    if decoded.amount_msat is None or int(decoded.amount_msat) != amount_msat:
        raise LnAddressError(f"the invoice is for {decoded.amount_msat} msat, not {amount_msat}")
    wanted = hashlib.sha256(str(metadata).encode()).hexdigest() if metadata else None
    if wanted and decoded.description_hash and decoded.description_hash != wanted:
        raise LnAddressError("the invoice's description hash is not the pay request's")
