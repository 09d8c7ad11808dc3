"""Writing outputs safely: a temporary name renamed into place when complete, never over an
existing non-empty folder unless asked, never into the folder a model was loaded from.

A temporary's name says who writes it: ``.out.tmp-<pid>-<start>-<machine>-<random>`` (the
process id, when that process started, and a hash of the host and its process namespace). A run
killed midway (SIGKILL, a power cut) cannot remove its temporary, which may hold a whole model;
the next write to the same destination removes the temporaries whose writer is gone, and says
so. A temporary whose writer still runs, or that another machine or container may be writing,
is never touched."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from mka_core.errors import MkaInputError

log = logging.getLogger(__name__)

# tests only: seconds a writer waits with its finished temporary before renaming it into place,
# so that tests/test_files.py can kill it mid-write (see `hold_for_tests`)
HOLD_ENV = "MKA_TEST_HOLD_TEMP"


def check_out_dir(out: str | Path, overwrite: bool = False, protect: list[str | Path] = ()) -> Path:
    """Validate an output folder before any work is done (so long work is never lost at the end)."""
    out = Path(out).expanduser()
    for p in protect:
        p = Path(p).expanduser()
        if p.exists() and (out.resolve() == p.resolve() or p.resolve() in out.resolve().parents):
            raise MkaInputError(f"refusing to write into {out}: a model was loaded from {p}")
    if out.exists() and not out.is_dir():
        raise MkaInputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MkaInputError(f"output folder {out} exists and is not empty (use --overwrite)")
    parent = out.resolve().parent
    if not parent.exists():
        raise MkaInputError(f"parent folder of {out} does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise MkaInputError(f"cannot write into {parent} (permission denied)")
    return out


@functools.cache
def _machine() -> str:
    """This host and process namespace, hashed: process ids mean something only within it."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return hashlib.sha256(f"{socket.gethostname()}|{ns}".encode()).hexdigest()[:8]


def _started(pid: int) -> int | None:
    """When process `pid` started (whole seconds since the epoch); None when it is gone."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by its parent
            return None
        return int(proc.create_time())
    except psutil.NoSuchProcess:
        return None


def _owner_tag() -> str:
    """``<pid>-<start>-<machine>-`` of this process, for the names of its temporaries."""
    pid = os.getpid()
    return f"{pid}-{_started(pid)}-{_machine()}-"


_TAG = re.compile(r"(\d+)-(\d+)-([0-9a-f]{8})-")


def _writer_gone(name: str, prefix: str) -> bool:
    """Whether the process that named this temporary is certainly gone: its id is free or now
    another process's (started at another time). Names without our tag, and temporaries of
    another host or container, are never judged gone."""
    m = _TAG.match(name, len(prefix))
    if m is None or m[3] != _machine():
        return False
    try:
        started = _started(int(m[1]))
    except psutil.AccessDenied:  # another user's live process
        return False
    # a start time read twice may differ by a second (the kernel's boot time is rounded)
    return started is None or abs(started - int(m[2])) > 2


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, f)).st_size
    return total


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def remove_stale_temps(parent: Path, prefix: str) -> list[tuple[Path, int]]:
    """Remove the temporaries named `prefix`<tag> in `parent` whose writing process is gone
    (left by a killed run), logging a warning for each; returns each one removed and its size
    in bytes. A temporary of a live process is never removed."""
    try:
        names = [e.name for e in os.scandir(parent) if e.name.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for name in names:
        if not _writer_gone(name, prefix):
            continue
        path = Path(parent) / name
        try:
            size = _size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another writer removed it first
            continue
        except OSError as e:
            log.warning("could not remove the stale temporary %s: %s", path, e.strerror or e)
            continue
        log.warning(
            "removed a stale temporary %s (%s) left by a killed run", name, _fmt_bytes(size)
        )
        removed.append((path, size))
    return removed


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new temporary folder ``prefix<pid>-<start>-<machine>-<random>`` in `parent`, with the
    permissions of an ordinary folder (mkdtemp makes it private, and the renamed result would
    stay so). The stale temporaries of the same prefix, left by killed runs, are removed first."""
    remove_stale_temps(parent, prefix)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix + _owner_tag()))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    return tmp


def hold_for_tests() -> None:
    """Tests only: with MKA_TEST_HOLD_TEMP=<seconds> a writer waits that long, its temporary
    complete, before renaming it into place, so that a test can kill it mid-write."""
    seconds = os.environ.get(HOLD_ENV)
    if seconds:
        time.sleep(float(seconds))


@contextlib.contextmanager
def atomic_dir(
    out: str | Path, overwrite: bool = False, protect: list[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out` in one rename."""
    out = check_out_dir(out, overwrite, protect)
    tmp = temp_dir(out.resolve().parent, f".{out.name}.tmp-")
    try:
        yield tmp
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` onto `out`. An existing `out` is moved aside first and
    removed once the new one is in place (put back if the rename fails). The backups that killed
    runs left beside it (``.out.old-<pid>-…``) are removed; one left while `out` was missing (a
    kill between the two renames) is the previous output and stays until `out` exists again."""
    hold_for_tests()
    if not out.exists():
        os.replace(tmp, out)
        return
    remove_stale_temps(out.parent, f".{out.name}.old-")
    backup = out.with_name(f".{out.name}.old-{_owner_tag()}{secrets.token_hex(4)}")
    os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise MkaInputError(f"{p} is a folder; expected a file name")
    if p.exists() and not overwrite:
        raise MkaInputError(f"{p} already exists; pass overwrite=True (--overwrite) to replace it")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(p.parent, f".{p.name}.tmp-")
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.tmp-{_owner_tag()}")
    except OSError as e:
        raise MkaInputError(f"cannot write {p}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder and a rename."""
    return write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite)
