"""Where PreResQ keeps what it builds, and how it writes, so that a crash or a full disk never leaves half a file.

    cache_dir("preset-tiny-1a2b3c")      # $PRERESQ_CACHE/<name>, default ~/.cache/preresq/<name>
    with atomic_folder(final) as tmp:    # write into tmp; renamed to `final` only when the block succeeds
        model.save_pretrained(tmp)
    write_file(path, text)               # a whole file, through a temporary sibling renamed into place
    write_file(path, line, append=True)  # a log line; cut back to its old length when the write fails
    with atomic_file(path, "wb") as f:   # a file written by a library (a PNG, a CSV), the same way
        image.save(f, format="PNG")

Every file the tools write goes through here: an OSError (no space left, a read-only disk, a folder
where the file should be) becomes one WriteError naming the file, and the file is left as it was.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from support.cli import Failure, InputError


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
    final, tmp = Path(final), None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        yield tmp
        if replace and final.exists():
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if replace or not final.exists():
                raise
    except OSError as e:  # a full or read-only disk: one WriteError naming the folder
        raise write_error(final, e, f"{final} was left as it was; the unfinished copy is removed.") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def partial_folders(parent: Path | str, names: str) -> list[Path]:
    """The temporary folders atomic_folder left in `parent` when a kill cut a write short: hidden
    siblings named ".<name>-" and tempfile's eight random characters, <name> matching the regular
    expression `names` (e.g. r"checkpoint-\\d+|final"). Nothing else is ever matched."""
    pattern = re.compile(rf"\.(?:{names})-[a-z0-9_]{{8}}")
    parent = Path(parent)
    return sorted(p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()) if parent.is_dir() else []


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: a new file gets the permissions open() would give it (mkstemp's are 0600)


class WriteError(Failure):
    """A file could not be written (no space left, a read-only disk, a folder in its place): the
    message names the file and says that it, and everything written before it, is as it was."""


def write_error(path: Path | str, error: BaseException, safe="") -> WriteError:
    """The WriteError for `error` while writing `path`: the reason, the free space, what is safe
    (`safe`: a sentence, or a function that writes it once it is needed)."""
    safe = safe() if callable(safe) else safe
    existing = next((p for p in [Path(path), *Path(path).absolute().parents] if p.exists()), Path("/"))
    try:
        free = f" ({shutil.disk_usage(existing).free / 2**20:,.0f} MiB free on that disk)"
    except OSError:
        free = ""
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    written = WriteError(f"could not write {path}: {reason}{free}. "
                         + (safe or f"{path} was left as it was, and every file written before it is intact."))
    written.error = getattr(error, "error", error)  # what the disk said (a WriteError's own)
    return written


@contextmanager
def atomic_file(path: Path | str, mode: str = "w", safe="", **open_options):
    """Yield a file open on a temporary sibling of `path` (".<name>-XXXXXXXX.partial"); when the block
    succeeds it replaces `path`. An OSError on the way removes the temporary file, leaves `path` as
    it was and is raised as a WriteError (`safe`: what the message says is safe instead of the default)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".partial", dir=path.parent)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_UMASK)
        with open(fd, mode, **open_options) as f:
            yield f
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e, safe) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_file(path: Path | str, data: str | bytes, append: bool = False, safe="") -> None:
    """Write `data` to `path` whole (atomic_file), or append it (a log line): then a failed write is
    cut back to the file's old length, so no torn line is left. OSError -> WriteError."""
    binary = "b" if isinstance(data, bytes) else ""
    if not append:
        with atomic_file(path, "w" + binary, safe, **({} if binary else {"encoding": "utf-8"})) as f:
            f.write(data)
        return
    size = None
    try:
        with open(path, "a" + binary, **({} if binary else {"encoding": "utf-8"})) as f:
            size = f.tell()
            f.write(data)
    except OSError as e:
        if size is not None:
            try:
                os.truncate(path, size)
            except OSError:
                pass
        raise write_error(path, e, safe) from None
