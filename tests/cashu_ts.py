"""cashu-ts, the TypeScript Cashu library most web wallets use, driven from the tests.

``tests/js`` pins ``@cashu/cashu-ts`` (package.json and its committed package-lock.json);
``CashuTs.install()`` runs ``npm ci`` there (node_modules is not committed) and ``interop.mjs``
does the wallet's part: mint at a FakeWallet mint, pay a NUT-18 request.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

JS_DIR = Path(__file__).resolve().parent / "js"
SCRIPT = JS_DIR / "interop.mjs"


class CashuTsError(RuntimeError):
    """The script failed; the message holds its stderr."""


class CashuTs:
    def __init__(self, folder: Path = JS_DIR) -> None:
        self.folder = folder

    def install(self) -> CashuTs:
        """``npm ci``: exactly the locked versions, into ``tests/js/node_modules``."""
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            raise CashuTsError("Node.js and npm are needed (./run.sh test installs them)")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                              cwd=self.folder, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise CashuTsError(f"npm ci failed: {done.stderr[-2000:]}")
        return self

    @property
    def version(self) -> str:
        package = self.folder / "node_modules" / "@cashu" / "cashu-ts" / "package.json"
        return str(json.loads(package.read_text())["version"])

    def run(self, *args: str, timeout: float = 60) -> dict[str, Any]:
        done = subprocess.run(["node", str(SCRIPT), *args], cwd=self.folder,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise CashuTsError(f"interop.mjs {args[0]} failed: {done.stderr[-4000:]}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def mint(self, mint_url: str, amount: int) -> list[dict[str, Any]]:
        """Fresh proofs worth ``amount`` sats, with their DLEQ proofs."""
        proofs: list[dict[str, Any]] = self.run("mint", mint_url, str(amount))["proofs"]
        return proofs

    def pay(self, mint_url: str, request: str, amount: int | None = None) -> str:
        """The cashuB token cashu-ts makes to pay a ``creqA…`` request (sendToRequest)."""
        args = ["pay", mint_url, request] + ([str(amount)] if amount is not None else [])
        token: str = self.run(*args)["token"]
        return token
