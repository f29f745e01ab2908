"""Secrets at rest (issue 11, item 7): the data folder is 0700, the ledger's files and the
mnemonic 0600 whatever the umask, and start-up names existing files others can read."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routstr_addon.datadir import exposed
from routstr_addon.runtime import Runtime
from routstr_addon.settings import load_config

from .conftest import raw, start_proxy


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most careless umask there is: every file would be world-readable and writable."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_a_fresh_data_folder_is_private_even_with_umask_0(
        tmp_path: Path, open_umask: None, mint: Any) -> None:
    data = tmp_path / "deep" / "data"
    config = load_config({"DATA_DIR": str(data), "CASHU_MINTS": mint.url,
                          "BTC_USD_PRICE": "50000", "MODEL_BASED_PRICING": "false"})
    runtime = Runtime.build(config)
    files = [data / "routstr.sqlite", data / "routstr.sqlite-wal", data / "routstr.sqlite-shm",
             data / "wallet-mnemonic.txt"]
    try:
        runtime.ledger.create_key(1000)  # a write: the WAL and shared memory exist (while open)
        assert mode(data) == 0o700
        for path in files:
            assert path.exists(), path
            assert mode(path) == 0o600, (path, oct(mode(path)))
        assert exposed([data, *files]) == []
    finally:
        runtime.ledger.close()


def test_start_up_warns_about_ledger_files_others_can_read(
        upstream: Any, tmp_path: Path) -> None:
    data = tmp_path / "p" / "data"
    data.mkdir(parents=True)
    os.chmod(data, 0o755)  # noqa: S103 - made by hand, the way a careless operator would
    db = data / "routstr.sqlite"
    db.touch()
    os.chmod(db, 0o644)
    proxy = start_proxy(tmp_path / "p", upstream.url,
                        {"UPSTREAM_BASE_URL": f"{upstream.url}/v1"})
    try:
        assert raw(proxy, "GET", "/health").status_code == 200
        proxy.output.wait_for(rf"{db} is readable by other users \(mode 644\).*chmod 600 {db}")
        proxy.output.wait_for(rf"{data} is readable by other users \(mode 755\).*chmod 700")
        assert mode(db) == 0o644  # reported, not changed behind the operator's back
    finally:
        proxy.stop()
