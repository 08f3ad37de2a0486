"""Where PreResQ keeps what it builds, and how it writes a folder so that a crash never leaves half of one.

    cache_dir("preset-tiny-1a2b3c")      # $PRERESQ_CACHE/<name>, default ~/.cache/preresq/<name>
    with atomic_folder(final) as tmp:    # write into tmp; renamed to `final` only when the block succeeds
        model.save_pretrained(tmp)

Used by the presets, the synthetic data sets and the checkpoints: one cache root, one atomic write.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from support.cli import InputError


def cache_dir(name: str = "") -> Path:
    """$PRERESQ_CACHE/name (default ~/.cache/preresq/name): where presets and synthetic sets are built once.

    An entry that is not there yet must be creatable: a cache root that is a file, lies below one or
    cannot be written is an InputError here, before the tool has made anything. An entry already
    there is returned as it is, so a read-only cache that holds what is needed still serves."""
    given = os.environ.get("PRERESQ_CACHE")
    root = Path(given).expanduser() if given else Path.home() / ".cache" / "preresq"
    entry = root / name if name else root
    if not entry.is_dir():
        check_creatable(entry, f"PRERESQ_CACHE={given}" if given else f"the cache {root}")
    return entry


def check_creatable(folder: Path, what: str) -> None:
    """InputError unless `folder` is a folder or can be made: not a file, not below one, writable."""
    fix = "point PRERESQ_CACHE at a writable folder (it holds the presets and synthetic sets built on first use)"
    if folder.exists():
        raise InputError(f"{what}: {folder} is a file, not a folder; {fix}.")
    existing = next(p for p in folder.absolute().parents if p.exists())
    if not existing.is_dir():
        raise InputError(f"{what}: cannot create {folder}, {existing} is a file; {fix}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what}: cannot create {folder}, {existing} is not writable (a read-only disk or "
                         f"folder); {fix}.")


@contextmanager
def atomic_folder(final: Path | str, replace: bool = False):
    """Yield a temporary sibling folder of `final`; when the block succeeds it is renamed to `final`.

    An exception in the block (a full disk, Ctrl-C) removes the temporary folder and leaves `final`
    as it was. replace=True replaces an existing `final` (a checkpoint written again); otherwise an
    existing `final` wins (another process built the same cache entry first) and ours is dropped.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        if replace and final.exists():
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if replace or not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
