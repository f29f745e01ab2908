"""A local Nutshell mint with the FakeWallet Lightning backend: for the demo and the tests.

FakeWallet pays its own invoices, so ecash is minted for free: it moves no real money. The mint
runs as a child process (``mint`` from the ``cashu`` package) from an empty working folder, so
no stray ``.env`` configures it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

__all__ = ["LocalMint", "free_port"]


def die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the parent dies, however it dies
    (a demo mint must not outlive the proxy that started it)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalMint:
    """``start()`` a FakeWallet mint on loopback; ``stop()`` and ``start()`` again keep its
    database (and so its keys and spent proofs)."""

    def __init__(self, folder: Path, *, port: int | None = None, input_fee_ppk: int = 0,
                 units: Sequence[str] = ("sat",), private_key: str = "routstr-local-mint",
                 incoming_delay: float = 0.2, outgoing_delay: float = 0.0) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.input_fee_ppk = input_fee_ppk
        self.units = tuple(units)
        self.private_key = private_key
        self.incoming_delay = incoming_delay
        self.outgoing_delay = outgoing_delay
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.folder),
            "DEBUG": "TRUE",  # also keeps nutshell from cutting tracebacks to one line
            "MINT_PRIVATE_KEY": self.private_key,
            "MINT_LISTEN_HOST": "127.0.0.1",
            "MINT_LISTEN_PORT": str(self.port),
            "MINT_DATABASE": str(self.folder / "db"),
            "MINT_AUTH_DATABASE": str(self.folder / "db" / "auth"),
            "MINT_RATE_LIMIT": "FALSE",
            "MINT_INPUT_FEE_PPK": str(self.input_fee_ppk),
            "FAKEWALLET_DELAY_INCOMING_PAYMENT": str(self.incoming_delay),
            "FAKEWALLET_DELAY_OUTGOING_PAYMENT": str(self.outgoing_delay),
            "MINT_INFO_NAME": "Routstr local FakeWallet mint (no real money)",
        }
        for unit in self.units:
            env[f"MINT_BACKEND_BOLT11_{unit.upper()}"] = "FakeWallet"
        # One keyset per unit: nutshell's derivation paths are m/0'/<unit index>'/<n>'.
        unit_index = {"sat": 0, "msat": 1, "usd": 2, "eur": 3}
        env["MINT_DERIVATION_PATH_LIST"] = json.dumps(
            [f"m/0'/{unit_index[u]}'/0'" for u in self.units])
        return env

    def start(self, timeout: float = 30.0) -> LocalMint:
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        mint = shutil.which("mint", path=str(Path(sys.executable).parent)) or "mint"
        log = open(self.folder / "mint.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.process = subprocess.Popen(
            [mint, "--host", "127.0.0.1", "--port", str(self.port)], cwd=self.folder,
            env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the mint exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v1/keysets", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the mint did not start: {self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        path = self.folder / "mint.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) \
            if path.exists() else ""


async def mint_token(url: str, amount: int, unit: str = "sat") -> str:
    """A fresh token of ``amount`` from a FakeWallet mint (its invoices pay themselves)."""
    import asyncio

    from routstr_addon.ecash.tokens import amounts_for, serialize_token
    from routstr_addon.ecash.wallet import MintWallet

    mint = MintWallet(url)
    try:
        await mint.load()
        quote = await mint.client.mint_quote(amount, unit)
        for _ in range(200):
            if (await mint.client.mint_quote_state(quote["quote"]))["state"] == "PAID":
                break
            await asyncio.sleep(0.05)
        outputs, secrets, rs = mint.blind(amounts_for(amount), mint.active(unit))
        signatures = await mint.client.mint(quote["quote"], outputs)
        return serialize_token(mint.url, unit, mint.unblind(signatures, outputs, secrets, rs))
    finally:
        await mint.client.aclose()


def port_or_free(preferred: int) -> int:
    """``preferred`` if nothing listens there (a stable URL across runs), else any free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred
