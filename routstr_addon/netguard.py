"""HTTP on a user's behalf without SSRF: the addresses users give (refund Lightning addresses,
LNURLs, the callbacks those name, the mints of tokens from untrusted mints) are fetched over
https, or over Tor for ``.onion``, and never reach loopback, private, link-local, multicast or
reserved addresses.

The check is made on the address each connection actually goes to: the host is resolved once
here, every address it resolves to is checked, and the socket is opened to a checked address
(TLS still verifies the host name). A name that resolves to a public address when asked and to
127.0.0.1 a moment later (DNS rebinding) gains nothing. The operator's own addresses
(``RECEIVE_LN_ADDRESS``, ``CASHU_MINTS``) are trusted and fetched with a plain client;
``ALLOW_PRIVATE_LN_ADDRESSES=true`` lifts every rule (tests, private deployments). Nostr
listings of other providers (anyone's URLs) are checked the same way, plain http allowed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import typing
from dataclasses import dataclass

import httpcore
import httpx

__all__ = ["AddressRefused", "GuardedTransport", "NetPolicy", "public_address", "refused"]


class AddressRefused(httpcore.ConnectError):
    """A connection the guard will not open (httpx raises it as ``httpx.ConnectError``)."""


def public_address(ip: str) -> bool:
    """Whether ``ip`` is an address on the public internet, not this machine, a private or
    link-local network, a multicast group or a reserved range (IPv4-mapped IPv6 included)."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (
        address.is_loopback or address.is_private or address.is_link_local
        or address.is_multicast or address.is_reserved or address.is_unspecified)


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to public addresses: resolves the host itself, connects to
    the first public address that answers, and checks the socket's peer again."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self.inner = inner

    # httpcore's interface takes ``timeout`` as an argument (ASYNC109)
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, TimeoutError) as e:
            raise httpcore.ConnectError(f"cannot resolve {host}: {e}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        allowed = [ip for ip in addresses if public_address(ip)]
        if not allowed:
            raise AddressRefused(f"{host} is not a public address ({', '.join(addresses)}); "
                                 "user-given addresses may not reach local or private networks")
        failure: Exception | None = None
        for ip in allowed:
            try:
                stream = await self.inner.connect_tcp(ip, port, timeout=timeout,
                                                      local_address=local_address,
                                                      socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                failure = e
                continue
            peer = stream.get_extra_info("server_addr")
            if not peer or not public_address(str(peer[0])):
                await stream.aclose()
                raise AddressRefused(f"{host} connected to a non-public address {peer}")
            return stream
        assert failure is not None
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: typing.Iterable[typing.Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("user-given addresses may not reach local sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, connecting only to public addresses and (``https_only``) speaking
    only https. Every connection is checked, a redirect's too."""

    def __init__(self, https_only: bool = True) -> None:
        super().__init__(trust_env=False)
        self.https_only = https_only
        pool = self._pool  # httpcore's pool: its network backend opens every connection
        pool._network_backend = _CheckedBackend(pool._network_backend)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.https_only and request.url.scheme != "https":
            message = (f"refused {request.url.scheme}://{request.url.host}: user-given "
                       "addresses must use https")
            raise httpx.ConnectError(message, request=request) from AddressRefused(message)
        return await super().handle_async_request(request)


def refused(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is the guard refusing an address."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, AddressRefused):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True, slots=True)
class NetPolicy:
    """How the proxy reaches addresses its users give it."""

    allow_private: bool = False  # ALLOW_PRIVATE_LN_ADDRESSES: no rule at all
    tor_proxy_url: str = ""  # SOCKS proxy for .onion hosts; "": they cannot be reached

    def mounts(self) -> dict[str, httpx.AsyncBaseTransport] | None:
        """The transports an ``httpx.AsyncClient`` for user-given URLs mounts (None: no rule,
        a plain client): public https hosts, ``.onion`` through Tor, nothing else."""
        if self.allow_private:
            return None
        mounts: dict[str, httpx.AsyncBaseTransport] = {"all://": GuardedTransport()}
        if self.tor_proxy_url:
            # httpx sends the host name to the SOCKS proxy, which resolves it (socks5h).
            proxy = httpx.Proxy(self.tor_proxy_url.replace("socks5h://", "socks5://", 1))
            mounts["all://*.onion"] = httpx.AsyncHTTPTransport(proxy=proxy, trust_env=False)
        return mounts

    def client(self, timeout: float = 15.0) -> httpx.AsyncClient:
        """A client for user-given URLs (see ``mounts``); redirects are not followed (each hop
        would need its own check)."""
        return httpx.AsyncClient(mounts=self.mounts(), timeout=timeout, trust_env=False)

    @staticmethod
    def trusted(timeout: float = 15.0) -> httpx.AsyncClient:
        """A plain client, for the operator's own addresses."""
        return httpx.AsyncClient(timeout=timeout)
