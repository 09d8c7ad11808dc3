"""Model weights on disk: reading safetensors shards lazily, and writing them tensor by tensor.

`SafetensorsStore` opens a Hugging Face folder (one ``*.safetensors`` file, or shards with a
``model.safetensors.index.json``), checks every shard up front (a missing shard, a truncated file
or an index naming absent tensors is a one-line `MkaInputError`, before any work), and hands out
one tensor at a time: a whole tensor read at its offset into memory of its own (`read_range`, no
memory map, so a thread can read the next block while torch computes, and memory is exactly the
tensor's); a range of rows the same way (an LM head a slice of the vocabulary at a time); corners
and embedding rows through ``safetensors.safe_open``'s memory map.

`ModuleStore` gives the same interface over a model held in memory, so the code that merges,
prunes and exports tensors does not care where the weights live.

`write_shards` writes a folder of standard shards (``model-0000k-of-0000n.safetensors`` and
``model.safetensors.index.json``) from a list of tensor names, shapes and dtypes known in advance:
each shard's header is written first and each tensor's bytes as soon as it is computed, so memory
holds one tensor, never a whole shard. (safetensors' own writer takes a complete dict, and mergekit's
shard writer keeps a shard's tensors until it flushes; neither bounds memory by one tensor.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mka_core.errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3  # 2 GiB: small enough to copy around, few files for a 70B model
_HEADER_LIMIT = 100 * 1024**2  # safetensors refuses headers above 100 MB as well

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPE_CODES[torch.float8_e4m3fn] = "F8_E4M3"
    DTYPE_CODES[torch.float8_e5m2] = "F8_E5M2"
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# reading


def read_header(path: Path, with_start: bool = False):
    """The JSON header of one safetensors file, checked against the file's size (and, with
    `with_start`, the offset where its tensor data begins)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MkaInputError(f"{path} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_LIMIT or 8 + n > size:
                raise MkaInputError(
                    f"{path} is truncated or not a safetensors file (header of {n} bytes, "
                    f"file of {size})"
                )
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MkaInputError(f"{path} is not a safetensors file (unreadable header)") from None
    except OSError as e:
        raise MkaInputError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(header, dict):
        raise MkaInputError(f"{path} is not a safetensors file (header is not an object)")
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = meta["data_offsets"]
            dtype, shape = meta["dtype"], meta["shape"]
        except (KeyError, TypeError, ValueError):
            raise MkaInputError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in CODE_DTYPES:
            raise MkaInputError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        want = math.prod(shape) * _itemsize(CODE_DTYPES[dtype])
        if stop - begin != want:
            raise MkaInputError(
                f"{path}: tensor {name!r} has {stop - begin} bytes, expected {want}"
            )
        end = max(end, stop)
    if 8 + n + end > size:
        raise MkaInputError(
            f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}"
        )
    return (header, 8 + n) if with_start else header


_ALIGN = 4096  # O_DIRECT wants offsets, sizes and buffers aligned to the device's blocks
_CHUNK = 16 * 1024**2


def read_range(path: Path, offset: int, nbytes: int) -> torch.Tensor:
    """`nbytes` bytes of a file at `offset`, as a uint8 tensor over memory of its own.

    Read with O_DIRECT where the file system allows it: the disk writes straight into the buffer
    (no page-cache copy, almost no CPU), which lets a reading thread overlap the compute on a
    2-core machine without slowing it much (measured: a buffered read slowed the overlapped
    matmuls by 65 %, O_DIRECT by 30 %); plain reads otherwise. The buffer is an anonymous mapping
    that asks for huge pages (page faults on fresh memory cost more than the reading here)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    a0 = offset // _ALIGN * _ALIGN
    size = -(-(offset + nbytes - a0) // _ALIGN) * _ALIGN
    buf = mmap.mmap(-1, size)
    with contextlib.suppress(AttributeError, OSError):
        buf.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(buf)
    done = _read_into(path, a0, view, direct=True)
    if done < 0:  # O_DIRECT refused by this file system
        done = _read_into(path, a0, view, direct=False)
    view.release()
    got = max(0, min(done - (offset - a0), nbytes))
    if not got:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8, count=got, offset=offset - a0)


def _read_into(path: Path, start: int, view: memoryview, direct: bool) -> int:
    """Bytes read into `view` from `start` (fewer at the end of the file); -1 when O_DIRECT is
    not available."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    if direct and not flags & getattr(os, "O_DIRECT", 0):
        return -1
    try:
        fd = os.open(path, flags)
    except OSError:
        if direct:
            return -1
        raise
    done = 0
    try:
        while done < len(view):
            n = os.preadv(fd, [view[done : done + _CHUNK]], start + done)
            if n == 0:
                break  # the end of the file, inside the last aligned block
            done += n
    except OSError:
        if direct:
            return -1
        raise
    finally:
        os.close(fd)
    return done


class TensorStore:
    """Named tensors that can be read one at a time (the interface merges and exports use)."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, on the CPU (or where the module keeps it)."""
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def get_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of a 2-D tensor (an embedding table) without keeping the whole table."""
        return self.get(name).index_select(0, rows.to(torch.long).cpu())

    def get_slice(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """The top-left corner [:rows, :cols] of a 2-D tensor (for fingerprints)."""
        return self.get(name)[:rows, :cols].clone()

    def get_row_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of a tensor (a slice of an LM head's vocabulary), without keeping
        the whole tensor."""
        return self.get(name)[start:stop]

    @property
    def n_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.names())


class SafetensorsStore(TensorStore):
    """The safetensors weights of a Hugging Face folder, checked when opened, read lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise MkaInputError(f"model folder not found: {self.folder}")
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise MkaInputError(f"{index} is not a valid safetensors index") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise MkaInputError(
                    f"{self.folder}: the index names {len(missing)} shard(s) that are missing: "
                    f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
                )
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise MkaInputError(
                    f"{self.folder} has no *.safetensors weights (pickle is not read)"
                )
            weight_map = None
        self._infos: dict[str, TensorInfo] = {}
        self._file_of: dict[str, str] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # (begin in the data, where data starts)
        for fname in files:
            header, data_start = read_header(self.folder / fname, with_start=True)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                self._infos[name] = TensorInfo(
                    name, tuple(meta["shape"]), CODE_DTYPES[meta["dtype"]]
                )
                self._file_of[name] = fname
                self._offsets[name] = (int(meta["data_offsets"][0]), data_start)
        if weight_map is not None:
            absent = [n for n, f in weight_map.items() if self._file_of.get(n) != f]
            if absent:
                raise MkaInputError(
                    f"{self.folder}: the index names {len(absent)} tensor(s) its shards do not "
                    f"hold, e.g. {absent[0]} in {weight_map[absent[0]]}"
                )

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise MkaInputError(f"{self.folder} holds no tensor {name!r}") from None

    def _open(self, name: str):

        self.info(name)
        return safe_open(str(self.folder / self._file_of[name]), framework="pt", device="cpu")

    def get(self, name: str) -> torch.Tensor:
        """The tensor read into memory of its own (see `read_range`): no memory map and no torch
        threads, so a prefetching thread can read the next block while the main one computes."""
        info = self.info(name)
        begin, data_start = self._offsets[name]
        path = self.folder / self._file_of[name]
        raw = read_range(path, data_start + begin, info.nbytes)  # (nbytes,) uint8
        if raw.numel() != info.nbytes:
            raise MkaInputError(f"{path.name} ended inside tensor {name} (truncated?)")
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        try:
            return raw.view(info.dtype).reshape(info.shape)
        except RuntimeError:  # an offset not aligned to the element size: copy once
            return raw.clone().view(info.dtype).reshape(info.shape)

    def get_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows of an embedding table, read run by run of consecutive ids: memory and disk reads
        are those rows, not the table (a 128 K-token vocabulary is 1 GB at d_model 4096)."""
        info = self.info(name)
        rows = rows.to(torch.long).cpu()
        order = torch.argsort(rows)
        srt = rows[order]
        out = torch.empty((len(rows), *info.shape[1:]), dtype=info.dtype)
        breaks = (torch.nonzero(srt[1:] != srt[:-1] + 1).flatten() + 1).tolist()
        with self._open(name) as f:
            sl = f.get_slice(name)
            start = 0
            for stop in [*breaks, len(srt)]:
                r0, r1 = int(srt[start]), int(srt[stop - 1]) + 1
                out[order[start:stop]] = sl[r0:r1]
                start = stop
        return out

    def get_slice(self, name: str, rows: int, cols: int) -> torch.Tensor:
        with self._open(name) as f:
            return f.get_slice(name)[:rows, :cols].clone()

    def get_row_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1, read like `get` (one contiguous range of the file, into memory of
        its own: no memory map, no page cache, so memory is the rows and nothing else)."""
        info = self.info(name)
        n_rows = info.shape[0] if info.shape else 0
        if not 0 <= start <= stop <= n_rows:
            raise MkaInputError(
                f"rows {start}..{stop} of {name} are out of range (it has {n_rows} rows)"
            )
        row_shape = info.shape[1:]
        row_bytes = math.prod(row_shape) * _itemsize(info.dtype)
        begin, data_start = self._offsets[name]
        path = self.folder / self._file_of[name]
        nbytes = (stop - start) * row_bytes
        raw = read_range(path, data_start + begin + start * row_bytes, nbytes)  # (nbytes,) uint8
        if raw.numel() != nbytes:
            raise MkaInputError(f"{path.name} ended inside tensor {name} (truncated?)")
        if nbytes == 0:
            return torch.empty((stop - start, *row_shape), dtype=info.dtype)
        try:
            return raw.view(info.dtype).reshape(stop - start, *row_shape)
        except RuntimeError:  # an offset not aligned to the element size: copy once
            return raw.clone().view(info.dtype).reshape(stop - start, *row_shape)


class ModuleStore(TensorStore):
    """The tensors of a model held in memory, under their state-dict names (read-only)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._tensors = {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()}
        if _tied(module):
            self._tensors.pop("lm_head.weight", None)  # one table, stored once (as on disk)

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(name, tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _tied(module: nn.Module) -> bool:
    out = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    inp = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    return out is not None and inp is not None and out.weight is inp.weight


# ---------------------------------------------------------------------------------------------
# writing


def shard_names(n: int) -> list[str]:
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def plan_shards(
    items: list[TensorInfo], max_bytes: int = MAX_SHARD_BYTES
) -> list[list[TensorInfo]]:
    """Consecutive groups of tensors of at most `max_bytes` each (a bigger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    return shards if shards[0] else []


def _header_bytes(items: list[TensorInfo]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for it in items:
        header[it.name] = {
            "dtype": DTYPE_CODES[it.dtype],
            "shape": list(it.shape),
            "data_offsets": [offset, offset + it.nbytes],
        }
        offset += it.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def check_disk_space(folder: Path, needed: int, what: str = "the export") -> None:
    """Refuse up front when the folder's file system lacks room for `needed` bytes."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = 64 * 1024**2
    if needed + margin > free:
        raise MkaInputError(
            f"not enough disk space for {what}: it needs {needed / 1e9:.2f} GB in {probe}, "
            f"which has {free / 1e9:.2f} GB free"
        )


def write_shards(
    folder: Path,
    items: Iterable[TensorInfo],
    produce: Callable[[TensorInfo], torch.Tensor],
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: ProgressFn | None = None,
) -> list[str]:
    """Write `items` into `folder` as safetensors shards plus an index; returns the file names.

    `produce(info)` is called once per tensor, in order, and must return a tensor of exactly that
    shape and dtype; it is written out at once and dropped, so memory holds one tensor."""
    items = list(items)
    if not items:
        raise MkaInputError("nothing to write: the model has no tensors")
    names_seen = set()
    for it in items:
        if it.name in names_seen:
            raise MkaInputError(f"tensor {it.name} would be written twice")
        names_seen.add(it.name)
    shards = plan_shards(items, max_shard_bytes)
    files = shard_names(len(shards))
    total = sum(it.nbytes for it in items)
    written = 0
    weight_map = {}
    # a writing thread writes tensor k (file I/O: no torch threads, the GIL released) while
    # this one computes tensor k + 1 (merged sums, casts): disk and CPU work at the same time
    with ThreadPoolExecutor(1) as writer:
        for fname, group in zip(files, shards):
            with (folder / fname).open("wb") as f:
                f.write(_header_bytes(group))
                pending = None
                for it in group:
                    t = produce(it)
                    if tuple(t.shape) != it.shape or t.dtype != it.dtype:
                        raise AssertionError(
                            f"{it.name}: produced {tuple(t.shape)} {t.dtype}, planned "
                            f"{it.shape} {it.dtype}"
                        )
                    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                    if pending is not None:
                        pending.result()  # one tensor in flight at most
                    pending = writer.submit(f.write, memoryview(raw))
                    del t, raw
                    weight_map[it.name] = fname
                    written += it.nbytes
                    report(
                        progress,
                        written / total,
                        f"wrote {written / 1e9:.2f} of {total / 1e9:.2f} GB ({fname})",
                    )
                if pending is not None:
                    pending.result()
                f.flush()
                os.fsync(f.fileno())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files
