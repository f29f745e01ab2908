"""The data folder and the secret files in it: made private whatever the umask, and checked
at start-up.

The ledger holds proof secrets and refund tokens, the mnemonic derives every secret of the
wallet: a local user who can read either can take the wallet's ecash. So ``DATA_DIR`` is
created 0700 and those files 0600 (SQLite gives its ``-wal`` and ``-shm`` files the database
file's mode); files made earlier by hand or by another tool are only reported, never changed.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["exposed", "private_dir", "private_file", "sqlite_files"]


def private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with mode 0700; an existing folder is left as is."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for made in missing:
        if made == path:  # the umask may have taken bits from mkdir's mode: set it exactly
            with contextlib.suppress(OSError):
                os.chmod(made, 0o700)


def private_file(path: Path) -> None:
    """Create an empty ``path`` with mode 0600 if it does not exist (the folder is made private
    too), so whatever writes it next does not choose the mode."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def sqlite_files(database_url: str) -> list[Path]:
    """The files of a SQLite ledger (the database, its write-ahead log and shared memory);
    none for another database."""
    if not database_url.startswith("sqlite:///"):
        return []
    path = Path(database_url.removeprefix("sqlite:///"))
    if str(path) == ":memory:":
        return []
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")]


def exposed(paths: Iterable[Path]) -> list[str]:
    """One warning line per existing path that others than its owner can read (a folder:
    enter), with the command that closes it."""
    warnings = []
    for path in paths:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        folder = stat.S_ISDIR(mode)
        open_bits = mode & (stat.S_IRWXG | stat.S_IRWXO) if folder else mode & 0o066
        if open_bits:
            wanted = "700" if folder else "600"
            warnings.append(f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}) "
                            f"and holds the wallet's secrets: chmod {wanted} {path}")
    return warnings
