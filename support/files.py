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


def cache_dir(name: str = "") -> Path:
    """$PRERESQ_CACHE/name (default ~/.cache/preresq/name): where presets and synthetic sets are built once."""
    root = Path(os.environ.get("PRERESQ_CACHE") or Path.home() / ".cache" / "preresq")
    return root / name if name else root


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
