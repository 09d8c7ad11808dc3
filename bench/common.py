"""What the benchmark sections share: their settings (full and --quick), facts about the machine,
wall-clock and peak-memory measurement, progress lines on stderr, and atomic result files."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"
QUICK_OUT = REPO / "bench" / "results" / "tmp" / "quick"  # git-ignored
COMMAND = "make bench  (= python -m bench.run)"


@dataclass(frozen=True)
class Settings:
    """Every size the benchmark uses; one object for the full run and one for --quick."""

    name: str
    model: str
    # calibration (analysis, planning, TransAct scoring, healing) and evaluation data
    calib_samples: int
    calib_tokens: int
    eval_tokens: int
    eval_window: int
    # quality
    budgets: tuple[int, ...]  # layers removed
    alpha_rules: tuple[str, ...]  # for mka; "drop" = fixed α 1: same pairs, second layer dropped
    fixed_alpha: float
    transact_samples: int  # calibration samples used to score TransAct units
    loss_samples: int  # calibration samples sleb, mka-loss, laco and the α search score with
    importance_samples: int  # calibration samples the measured importance uses
    transact_shots: int
    heal_steps: int
    heal_budgets: tuple[int, ...]  # healing is slow on a CPU: only at these budgets
    heal_batch: int
    heal_lr: float
    plan_limit_s: float  # a planner still running after this is stopped and reported as such
    speed_prompt_tokens: int
    decode_tokens: int
    speed_repeats: int
    # cost
    cost_samples: tuple[int, ...]
    cost_tokens: int
    cost_layers: tuple[int, ...]  # layer counts for the growth with depth
    cost_layers_samples: int
    cost_plan_remove: int
    # app
    app_calib_samples: int
    app_calib_tokens: int
    app_repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Settings(
    name="full",
    model="bundled:smollm2-135m",
    calib_samples=128,
    calib_tokens=128,
    eval_tokens=8192,
    eval_window=512,
    budgets=(3, 6, 10),
    alpha_rules=("similarity", "rowmean", "fixed", "search", "drop"),
    fixed_alpha=0.5,
    transact_samples=32,
    loss_samples=16,
    importance_samples=32,
    transact_shots=4,
    heal_steps=10,
    heal_budgets=(6, 10),
    heal_batch=4,
    heal_lr=1e-4,
    plan_limit_s=900,
    speed_prompt_tokens=64,
    decode_tokens=16,
    speed_repeats=2,
    cost_samples=(64, 128, 256, 512),
    cost_tokens=64,
    cost_layers=(8, 15, 22, 30),
    cost_layers_samples=64,
    cost_plan_remove=6,
    app_calib_samples=32,
    app_calib_tokens=64,
    app_repeats=3,
)

QUICK = Settings(
    name="quick",
    model="tiny:llama",
    calib_samples=32,
    calib_tokens=32,
    eval_tokens=512,
    eval_window=128,
    budgets=(1, 2),
    alpha_rules=("similarity", "rowmean", "fixed", "search", "drop"),
    fixed_alpha=0.5,
    transact_samples=16,
    loss_samples=8,
    importance_samples=16,
    transact_shots=2,
    heal_steps=3,
    heal_budgets=(2,),
    heal_batch=4,
    heal_lr=1e-4,
    plan_limit_s=30,
    speed_prompt_tokens=32,
    decode_tokens=8,
    speed_repeats=2,
    cost_samples=(32, 64),
    cost_tokens=32,
    cost_layers=(3, 6),
    cost_layers_samples=32,
    cost_plan_remove=2,
    app_calib_samples=16,
    app_calib_tokens=32,
    app_repeats=2,
)


# ---------------------------------------------------------------------------------------------
# progress

T0 = time.perf_counter()  # when the benchmark process started (first import)


def say(msg: str) -> None:
    """A progress line on stderr, with the time since the benchmark started."""
    el = time.perf_counter() - T0
    print(f"[bench {int(el // 60):02d}:{el % 60:04.1f}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(
                    f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                )
    except OSError:
        pass
    return []


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _mem_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def machine_info() -> dict:
    import torch
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    status = _git("status", "--porcelain")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_mb": _mem_total_mb(),
        "device": device_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "load_average_start": load_average(),
    }


def machine_line(m: dict) -> str:
    """One line for a figure or a table caption: what ran, where, when."""
    cores = m.get("cores")
    date = (m.get("date") or "")[:10]
    return f"{m.get('cpu', '?')}, {cores} cores, {m.get('device', '?')} · {date}"


# ---------------------------------------------------------------------------------------------
# time and memory


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim), so that the
    resident memory at a stage's start is what is live, and what the stage allocates shows."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


class Measure:
    """Wall-clock seconds and peak memory of a block of code.

    On a GPU, peak_mb is torch's peak allocated device memory during the block. On the CPU it is
    the peak resident memory of this process during the block (the kernel's high-water mark,
    reset at the start; a sampling thread where that is unavailable), so it includes the models
    already loaded; `added_mb` is the peak minus the resident memory at the start, after freed
    heap memory was handed back to the OS (else new arrays reuse it and nothing seems added)."""

    def __init__(self):
        self.seconds = 0.0
        self.peak_mb = 0.0
        self.added_mb = 0.0

    def __enter__(self) -> Measure:
        import torch

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start_mb = torch.cuda.memory_allocated() / 2**20
        else:
            _release_free_memory()
            self._start_mb = _rss_mb()
            self._hwm = _reset_hwm() and _hwm_mb() is not None
            self._sampled = self._start_mb
            if not self._hwm:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._sampled = max(self._sampled, _rss_mb())

    def __exit__(self, *exc) -> None:
        import torch

        if self._cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._t0
        if self._cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20
        elif self._hwm:
            peak = _hwm_mb() or _rss_mb()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, _rss_mb())
        self.peak_mb = round(peak, 1)
        self.added_mb = round(max(peak - self._start_mb, 0.0), 1)


# ---------------------------------------------------------------------------------------------
# result files, written atomically


def write_atomic(path: Path, data: str | bytes) -> Path:
    """The product's atomic writer (a temporary file in the same folder, then a rename)."""
    from mka_core.files import write_bytes_atomic

    return write_bytes_atomic(
        path, data.encode("utf-8") if isinstance(data, str) else data, overwrite=True
    )


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in columns})
    return write_atomic(path, buf.getvalue())


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: Path) -> list[dict]:
    """Rows with numbers parsed back (ints, floats, booleans; empty cells become None)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(v: str):
    if v == "":
        return None
    if v in ("true", "false"):
        return v == "true"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def write_json(path: Path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return default


def loaded_analysis(settings: Settings):
    """The settings' model and its analysis on the quality section's calibration batch (no
    stability resampling): what the frontier, quantization and distillation sections start from."""
    from mka_core.models.loading import load_model
    from mka_core.workflows import pipeline

    loaded = load_model(settings.model)
    analysis = pipeline.analyze(
        loaded,
        n_samples=settings.calib_samples,
        max_tokens=settings.calib_tokens,
        stability=False,
        progress=lambda f, msg: None,
    )
    return loaded, analysis


def sweep_progress(prefix: str):
    """A progress callback for `compare_sweep`: each finished config, else a line per 15 s."""
    last = [0.0]

    def progress(fraction: float, msg: str) -> None:
        if time.perf_counter() - last[0] > 15 or msg.startswith("compare:"):
            say(f"{prefix}: {msg}")
            last[0] = time.perf_counter()

    return progress
