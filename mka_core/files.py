"""Writing outputs safely: a temporary name renamed into place when complete, never over an
existing non-empty folder unless asked, never into the folder a model was loaded from."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mka_core.errors import MkaInputError


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


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new temporary folder in `parent` with the permissions of an ordinary folder (mkdtemp
    makes it private, and the renamed result would stay so)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    return tmp


@contextlib.contextmanager
def atomic_dir(
    out: str | Path, overwrite: bool = False, protect: list[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out` in one rename."""
    out = check_out_dir(out, overwrite, protect)
    tmp = temp_dir(out.resolve().parent, f".{out.name}.tmp-")
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise MkaInputError(f"{p} is a folder; expected a file name")
    if p.exists() and not overwrite:
        raise MkaInputError(f"{p} already exists; pass overwrite=True (--overwrite) to replace it")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
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
