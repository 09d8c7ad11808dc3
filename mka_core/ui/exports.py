"""The app's export action: a run's compressed model written as a Hugging Face folder (in the
workspace's exports folder unless a full path is typed), and a zip of it for download."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import streamlit as st

from mka_core.engine.quant import QUANT_HELP
from mka_core.errors import MkaInputError, ProgressFn
from mka_core.ui import session
from mka_core.ui import state as S
from mka_core.ui.resources import current_model
from mka_core.workflows.gguf_export import write_gguf_beside
from mka_core.workflows.pipeline import export_run as _export

OUT_DTYPES = {"the source's": None, "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
GGUF_CHOICES = {"no GGUF": None, **{f"GGUF {q}: {h}": q for q, h in QUANT_HELP.items()}}


def default_export_folder(run_index: int) -> str:
    """The workspace's exports folder for a run, as a full path."""
    return str((session.exports_dir() / f"run-{run_index + 1}").resolve())


def resolve_folder(text: str) -> Path:
    """A typed folder as the full path the server will write (relative paths start in the
    workspace's exports folder, not wherever the server happens to run)."""
    if not text or not text.strip():
        raise MkaInputError("output folder is empty; type a folder path")
    p = Path(text.strip()).expanduser()
    return (p if p.is_absolute() else session.exports_dir() / p).resolve()


def export_run(
    run_index: int,
    out_dir: str,
    overwrite: bool = False,
    out_dtype: str | None = None,
    progress: ProgressFn | None = None,
    gguf: str | None = None,
) -> tuple[Path, Path | None]:
    """Write run `run_index`'s model as a folder and, with `gguf` (a quantization type), also as
    a GGUF file in it; returns (folder, GGUF file or None)."""

    out = resolve_folder(out_dir)
    runs = st.session_state.get(S.RUNS) or []
    if not 0 <= run_index < len(runs):
        raise MkaInputError(f"run {run_index + 1} does not exist")
    run = runs[run_index]
    if run.model is None:
        raise MkaInputError(
            f"run {run_index + 1}'s compressed model is not in memory (only the last "
            f"{S.KEEP_MODELS} are kept, and none after a restart): run its plan again to export it"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MkaInputError(
            f"{out} exists and is not empty: choose another folder, or tick "
            f"“Replace the folder if it exists”"
        )
    spec = st.session_state.get(S.MODEL_SPEC)
    loaded = current_model()
    if out_dtype is None and loaded is not None:
        out_dtype = loaded.source_dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _export(
        run,
        out,
        overwrite=overwrite,
        loaded_from=spec.source if spec else None,
        out_dtype=out_dtype,
        progress=progress,
    )
    st.session_state.setdefault(S.EXPORTS, {})[run_index] = str(path)
    session.save_state()
    gguf_path = write_gguf_beside(path, gguf, progress=progress) if gguf else None
    return path, gguf_path


def folder_zip(folder: str | Path) -> bytes | None:
    """A zip of an exported model folder, or None when it is larger than ZIP_LIMIT."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = [f for f in sorted(folder.rglob("*")) if f.is_file()]
    if sum(f.stat().st_size for f in files) > S.ZIP_LIMIT:
        return None
    return _zip_folder(str(folder), max(f.stat().st_mtime for f in files) if files else 0.0)


@st.cache_data(show_spinner="Zipping…", max_entries=2)
def _zip_folder(folder: str, mtime: float) -> bytes:
    root = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                zf.write(f, f"{root.name}/{f.relative_to(root)}")
    return buf.getvalue()
