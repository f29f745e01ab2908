"""A user's Cashu wallet for the tests: nutshell's own ``Wallet``, on its own event loop thread,
minting tokens at a test mint (FakeWallet pays itself) and redeeming what the proxy hands back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from routstr_addon.ecash.tokens import nutshell

T = TypeVar("T")


class UserWallet:
    def __init__(self, mint_url: str, folder: Path, unit: str = "sat") -> None:
        nutshell()
        self.mint_url = mint_url
        self.folder = folder
        self.unit = unit
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.wallet: Any = self.run(self._open())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _open(self) -> Any:
        from cashu.wallet.wallet import Wallet

        self.folder.mkdir(parents=True, exist_ok=True)
        wallet = await Wallet.with_db(self.mint_url, db=str(self.folder), name="user",
                                      unit=self.unit)
        await wallet.load_mint()
        await wallet.load_proofs()
        return wallet

    async def _fund(self, amount: int) -> None:
        quote = await self.wallet.request_mint(amount)
        for _ in range(100):
            try:
                await self.wallet.mint(amount, quote_id=quote.quote)
                return
            except Exception as e:  # FakeWallet pays the invoice after a short delay
                if "not paid" not in str(e).lower() and "pending" not in str(e).lower() \
                        and "unpaid" not in str(e).lower():
                    raise
                await asyncio.sleep(0.1)
        raise RuntimeError("the test mint never paid its invoice")

    async def _token(self, amount: int, legacy: bool, dleq: bool) -> str:
        if self.wallet.available_balance.amount < amount:
            await self._fund(max(amount, 5000))
        send, _ = await self.wallet.select_to_send(self.wallet.proofs, amount,
                                                   set_reserved=True)
        if sum(p.amount for p in send) != amount:
            _, send = await self.wallet.swap_to_send(self.wallet.proofs, amount,
                                                     set_reserved=True)
        token: str = await self.wallet.serialize_proofs(send, include_dleq=dleq, legacy=legacy)
        return token

    def token(self, amount: int, *, legacy: bool = False, dleq: bool = False) -> str:
        """A fresh token of exactly ``amount`` (cashuB, or cashuA with ``legacy``)."""
        return self.run(self._token(amount, legacy, dleq))

    async def _receive(self, token: str) -> int:
        from cashu.wallet.helpers import deserialize_token_from_string

        parsed = deserialize_token_from_string(token)
        proofs = parsed.proofs
        await self.wallet._expand_short_keyset_ids(proofs)
        before = self.wallet.available_balance
        await self.wallet.redeem(proofs)
        await self.wallet.load_proofs(reload=True)
        return int(self.wallet.available_balance.amount - before.amount)

    def receive(self, token: str) -> int:
        """Redeem a token at the mint; how much the balance grew (after the mint's fee)."""
        return self.run(self._receive(token))

    def proof_count(self, token: str) -> int:
        from cashu.wallet.helpers import deserialize_token_from_string

        return len(deserialize_token_from_string(token).proofs)

    def amount(self, token: str) -> int:
        from cashu.wallet.helpers import deserialize_token_from_string

        return int(deserialize_token_from_string(token).amount)

    def spent(self, token: str) -> bool:
        """Whether the mint has seen the token's proofs spent."""
        from cashu.wallet.helpers import deserialize_token_from_string

        async def check() -> bool:
            proofs = deserialize_token_from_string(token).proofs
            await self.wallet._expand_short_keyset_ids(proofs)
            states = await self.wallet.check_proof_state(proofs)
            return all(s.spent for s in states.states)

        return self.run(check())

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
