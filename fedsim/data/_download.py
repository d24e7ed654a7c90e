"""Opt-in file download with checksum, for datasets loaded with ``download=True``.

Private to :mod:`fedsim.data`. Nothing here runs unless a user asks for a
download; the test suite never does.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from fedsim.exceptions import DataError

__all__ = ["fetch", "md5sum"]

_CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    """Hex MD5 digest of a file (a checksum against corruption, not security)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(urls: Sequence[str], dest: Path, *, md5: str, timeout: float = 60.0) -> None:
    """Download ``dest`` from the first of ``urls`` that serves the right file.

    The file is written next to ``dest`` under a temporary name and renamed
    into place only once its MD5 matches, so an interrupted download never
    leaves a truncated file behind.

    Raises
    ------
    DataError
        If no URL gives a file with the expected checksum.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    failures: list[str] = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                with partial.open("wb") as out:
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        out.write(block)
        except OSError as exc:
            failures.append(f"{url} ({exc})")
            continue
        got = md5sum(partial)
        if got == md5:
            os.replace(partial, dest)
            return
        failures.append(f"{url} (checksum {got}, expected {md5})")
    partial.unlink(missing_ok=True)
    raise DataError(
        f"could not download {dest.name} into {dest.parent}: tried "
        f"{'; '.join(failures)}"
    )
