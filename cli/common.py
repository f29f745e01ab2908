"""What every ``routstr`` command shares: the consoles, errors with exit codes, the settings and
the ledger they name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from routstr_addon import settings
from routstr_addon.amounts import sats as sats  # the one formatter, for every command
from routstr_addon.ledger import Ledger

console = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

NO_MINTS = "no mints configured (CASHU_MINTS)"


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def load_config() -> settings.Config:
    """The settings as the proxy reads them (env, then ``.env``); exit 2 on a bad one."""
    try:
        return settings.load_config()
    except settings.SettingError as e:
        raise fail(str(e), 2) from None


def mints_of(config: settings.Config) -> tuple[str, ...]:
    """The trusted mints; exit 2 if there are none."""
    if not config.cashu_mints:
        raise fail(NO_MINTS, 2)
    return config.cashu_mints


@contextmanager
def open_ledger(config: settings.Config | None = None) -> Iterator[Ledger]:
    ledger = Ledger((config or load_config()).database_url)
    try:
        yield ledger
    finally:
        ledger.close()
