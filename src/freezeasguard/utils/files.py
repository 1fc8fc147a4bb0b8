"""Atomic file and directory writes (a crash or Ctrl-C never leaves half a model, guard or checkpoint), and
output directories owned by one run (`claim_output_dir`)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FreezeAsGuardError

LOCK_NAME = ".freezeasguard.lock"
RUN_RECORD = ".freezeasguard-run.json"
# What atomic_directory / atomic_write_bytes leave behind when killed: ".<name>.tmp-XXXXXXXX" / ".<name>.old-...".
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-[a-z0-9_]{8}$")


class OutputDirError(FreezeAsGuardError, ValueError):
    """An output directory cannot be used: in use by another run, holding someone else's files or another
    configuration's results, or not writable."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    With overwrite=False an existing `path` is an error raised before any work is done. With overwrite=True
    the old directory is removed only once the new one is complete.
    """
    dest = Path(path).expanduser()
    if dest.exists() and not overwrite:
        raise FreezeAsGuardError(f"{dest}: already exists (pass overwrite=True / --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should read like any directory
    try:
        yield tmp
        swap_directory(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_directory(tmp: Path, dest: Path) -> None:
    """Put the complete directory `tmp` at `dest` by renames: an existing `dest` is moved aside first and
    restored if the second rename fails, so `dest` is always either the old or the new directory."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(old / dest.name, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    dest = Path(path).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the result should follow the umask
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# The largest JSON file read from a user (guards, configs, indexes). The largest this library writes, a guard
# of an SDXL-sized UNet with scores and text-encoder records, is a few MB.
MAX_JSON_BYTES = 64 << 20


def read_bounded(path: str | Path, what: str, error: type[Exception] = ValueError, *, limit: int = MAX_JSON_BYTES) -> bytes:
    """A user's file's bytes, refused (naming the file) when larger than `limit`, before and while reading."""
    p = Path(path)
    size = p.stat().st_size
    if size > limit:
        raise error(f"{p}: {size} bytes, larger than any {what} ({limit} bytes at most)")
    with p.open("rb") as f:  # the size may change after stat: read at most one byte past the limit
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{p}: larger than any {what} ({limit} bytes at most)")
    return data


def read_json(path: str | Path, what: str, error: type[Exception] = ValueError, *, limit: int = MAX_JSON_BYTES) -> Any:
    """A user's JSON file, with errors that name the file and what it should have been; a file larger than
    `limit` is refused before it is read."""
    p = Path(path)
    try:
        return json.loads(read_bounded(p, what, error, limit=limit).decode("utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{p}: no such {what}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{p}: not a readable JSON {what}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise error(f"{p}: not a readable JSON {what} ({exc})") from exc


def canonical_digest(obj: Any) -> str:
    """SHA-256 of an object's canonical JSON (sorted keys; non-JSON values by str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@dataclass
class OutputClaim:
    """An output directory held by this run: `resumed` when it holds an earlier run of the same configuration."""

    path: Path
    resumed: bool


def _holder() -> str:
    cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:6]))
    since = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} ({cmd}), since {since}"


def _lock(dest: Path) -> int:
    """An exclusive lock on dest/.freezeasguard.lock for this process's life of the claim; fails at once,
    naming the holder, if another run holds it. (Where there is no flock, on Windows, the directory is still
    checked writable and owned, but not locked.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None  # type: ignore[assignment]
    try:
        fd = os.open(dest / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as exc:
        raise OutputDirError(f"{dest}: not writable ({exc.strerror}); choose another output directory") from exc
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise OutputDirError(f"{dest}: in use by another run ({holder}); wait for it to finish or choose another "
                             "output directory") from exc
    os.ftruncate(fd, 0)
    os.write(fd, (_holder() + "\n").encode())
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _stale_temps(dest: Path, owned: set[str]) -> list[Path]:
    """Leftovers of a killed run of ours: temp siblings of our products in dest, and any temp entry inside the
    directories we own (checkpoints/, model/, ...)."""
    found = []
    for p in dest.iterdir():
        m = _TEMP.match(p.name)
        if m and (m.group("name") in owned or m.group("name") == RUN_RECORD):
            found.append(p)
    for name in owned:
        root = dest / name
        if root.is_dir() and not root.is_symlink():
            for dirpath, dirnames, filenames in os.walk(root):
                for entry in dirnames + filenames:
                    if _TEMP.match(entry):
                        found.append(Path(dirpath) / entry)
                dirnames[:] = [d for d in dirnames if not _TEMP.match(d)]
    return found


def _identity_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _identity_changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1] or 'configuration'}: {old!r} -> {new!r}"]


@contextlib.contextmanager
def claim_output_dir(path: str | Path | None, command: str, identity: Mapping[str, Any], products: Iterable[str], *,
                     overwrite: bool = False, main: bool | None = None) -> Iterator[OutputClaim | None]:
    """Own an output directory for one run of `command`.

    - An exclusive lock (dest/.freezeasguard.lock) is held until the block ends: a second run on the same
      directory fails at once, naming the holder. Taking it also proves the directory is writable, before any
      work is done.
    - `identity` is what must be equal for a rerun to continue the earlier one (configuration, data, base);
      it is kept in dest/.freezeasguard-run.json with the `products` (top-level names the command writes).
    - A non-empty directory that is not a run of this command with this identity is refused, unless
      `overwrite`; even then only files recorded as written by an earlier run are deleted, and a product name
      already taken by a file the tool did not write is an error naming it.
    - Temp files and directories of a killed run of ours (".model.tmp-XXXXXXXX", ".step-....tmp-...") are removed.

    `path=None` claims nothing. Only the main process claims (`main`; default: RANK unset or 0): under
    torchrun the other ranks share the main process's claim.
    """
    if path is None:
        yield None
        return
    dest = Path(path).expanduser()
    if main is None:
        main = os.environ.get("RANK", "0") == "0"
    if not main:
        yield OutputClaim(dest, resumed=False)
        return
    if dest.exists() and not dest.is_dir():
        raise OutputDirError(f"{dest}: exists and is not a directory; choose another output directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{dest}: cannot create the output directory ({exc.strerror or exc})") from exc
    products = sorted(set(products))
    ident = json.loads(json.dumps(dict(identity), sort_keys=True, default=str))
    fd = _lock(dest)
    try:
        record = None
        if (dest / RUN_RECORD).is_file():
            try:
                record = json.loads((dest / RUN_RECORD).read_text())
                owned_before = set(record["products"])
                # only plain names directly in dest: an edited record must not make --overwrite delete elsewhere
                bad = [n for n in owned_before if not isinstance(n, str) or n in ("", ".", "..") or Path(n).name != n]
                if bad:
                    raise ValueError(f"product names that are not plain names in the directory: {bad[:3]}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise OutputDirError(f"{dest / RUN_RECORD}: unreadable run record ({exc}); delete it to reuse "
                                     "the directory") from exc
        else:
            owned_before = set()
        for stale in _stale_temps(dest, owned_before) if record is not None else []:
            _remove(stale)
        present = sorted(p.name for p in dest.iterdir() if p.name not in (LOCK_NAME, RUN_RECORD))
        same = record is not None and record.get("command") == command and record.get("identity") == ident
        if record is not None and not same and not any((dest / n).exists() for n in owned_before):
            record = None  # an earlier run that wrote nothing (it failed before its first output): nothing to keep
        if record is None and present and not overwrite:
            raise OutputDirError(f"{dest}: not empty and not a freezeasguard {command} run (holds {present[:5]}); "
                                 "choose an empty output directory or pass --overwrite (files the tool did not "
                                 "write are never deleted)")
        if record is not None and not same and not overwrite:
            what = (f"a {record.get('command')} run" if record.get("command") != command else
                    "a run of another configuration (" + "; ".join(
                        _identity_changes(record.get("identity"), ident)[:5]) + ")")
            raise OutputDirError(f"{dest}: holds {what}; rerun with the same settings to resume, choose another "
                                 "output directory, or pass --overwrite to replace its results")
        if overwrite:
            for name in sorted(owned_before):
                if (dest / name).exists() or (dest / name).is_symlink():
                    _remove(dest / name)
        left = {p.name for p in dest.iterdir()}
        foreign = sorted(n for n in products if n in left and n not in owned_before)
        if foreign:
            raise OutputDirError(f"{dest}: {', '.join(foreign)} already there and not written by this tool (not in "
                                 f"its {RUN_RECORD}); move it away (it is never deleted) or choose another output "
                                 "directory")
        atomic_write_json(dest / RUN_RECORD, {"format": "freezeasguard-run", "command": command, "identity": ident,
                                              "products": products})
        yield OutputClaim(dest, resumed=same and not overwrite)
    finally:
        os.close(fd)  # closing the descriptor releases the lock; the file stays (unlinking it would race)
