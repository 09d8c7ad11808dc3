"""Temporaries left by killed runs: an export killed midway leaves its hidden temporary folder
(a whole model); the next write to the same destination removes it and says so, and never
touches the temporary of a process that is still running."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mka_core.files import (
    HOLD_ENV,
    _machine,
    atomic_dir,
    remove_stale_temps,
    temp_dir,
    write_text_atomic,
)
from mka_core.models.cache import into_cache

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "mka_core", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        **kw,
    )


def _temps(folder: Path, prefix: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(prefix))


def _has_shard(folder: Path) -> bool:
    """A temporary of `out` in `folder` holds a shard (read while a writer may remove it)."""
    for tmp in _temps(folder, ".out.tmp-"):
        try:
            if any(p.suffix == ".safetensors" for p in tmp.iterdir()):
                return True
        except FileNotFoundError:
            pass
    return False


def _tag(proc: psutil.Process | subprocess.Popen) -> str:
    pid = proc.pid
    return f"{pid}-{int(psutil.Process(pid).create_time())}-{_machine()}-"


@pytest.fixture()
def sleeper():
    """Another live process, killed and reaped on demand (`.stop()`)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    proc.tag = _tag(proc)

    def stop():
        proc.kill()
        proc.wait(timeout=30)

    proc.stop = stop
    yield proc
    if proc.poll() is None:
        stop()


def test_a_killed_export_leaves_a_temporary_the_next_export_removes(tmp_path):
    """A real `plan --apply` export, SIGKILLed while its temporary is complete but not yet
    renamed (MKA_TEST_HOLD_TEMP holds it there); the same export again removes the stale
    temporary, says so on one line, and writes the model."""
    out = tmp_path / "out"
    args = ["plan", "--model", "tiny:llama", "--quiet", "--planner", "manual"]
    args += ["--picks", "drop:3", "--apply", str(out)]
    killed = _cli(*args, "--out", str(tmp_path / "plan1.json"), env={HOLD_ENV: "600"})
    try:
        deadline = time.time() + 300
        while not _has_shard(tmp_path):
            assert killed.poll() is None, f"the export ended first: {killed.communicate()}"
            assert time.time() < deadline, "the export wrote no temporary in 300 s"
            time.sleep(0.05)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    (stale,) = _temps(tmp_path, ".out.tmp-")
    assert stale.name.startswith(f".out.tmp-{killed.pid}-")
    assert not out.exists()
    size = sum(f.stat().st_size for f in stale.iterdir())
    assert 1e3 <= size < 1e6  # the tiny model: its size is shown in KB

    again = _cli(*args, "--out", str(tmp_path / "plan2.json"))
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert _temps(tmp_path, ".out.tmp-") == []
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    (line,) = [ln for ln in err.splitlines() if "stale temporary" in ln]
    assert line == (
        f"removed a stale temporary {stale.name} ({size / 1e3:.1f} KB) left by a killed run"
    )


def test_a_live_writers_temporary_is_kept_a_dead_ones_removed(tmp_path, sleeper, caplog):
    mine = temp_dir(tmp_path, ".out.tmp-")  # this process: alive
    (mine / "model-00001-of-00001.safetensors").write_bytes(b"x" * 2500)
    theirs = tmp_path / f".out.tmp-{sleeper.tag}abc"  # another live process
    theirs.mkdir()
    (theirs / "shard").write_bytes(b"y" * 10)
    old_style = tmp_path / ".out.tmp-k3j4h5g6"  # mkdtemp's name, owner unknown
    old_style.mkdir()
    elsewhere = tmp_path / f".out.tmp-{sleeper.pid}-{int(time.time())}-0000ffff-abc"
    elsewhere.mkdir()  # another host's or container's process id: not ours to judge
    other_dest = tmp_path / f".other.tmp-{sleeper.tag}abc"
    other_dest.mkdir()

    second = temp_dir(tmp_path, ".out.tmp-")
    assert all(p.is_dir() for p in (mine, theirs, old_style, elsewhere, other_dest, second))

    sleeper.stop()  # its temporaries are now stale: removed by the next write, with a warning
    with caplog.at_level(logging.WARNING, logger="mka_core.files"):
        third = temp_dir(tmp_path, ".out.tmp-")
    assert not theirs.exists()
    assert other_dest.exists()  # another destination's: removed by a write to that one
    assert all(p.is_dir() for p in (mine, old_style, elsewhere, second, third))
    assert caplog.messages == [
        f"removed a stale temporary {theirs.name} (10 bytes) left by a killed run"
    ]
    assert remove_stale_temps(tmp_path, ".other.tmp-") == [(other_dest, 0)]


def test_a_reused_process_id_does_not_keep_a_stale_temporary(tmp_path, sleeper):
    """The id of a dead writer may now be another process's: the start time tells them apart."""
    started = int(psutil.Process(sleeper.pid).create_time())
    reused = tmp_path / f".out.tmp-{sleeper.pid}-{started - 3600}-{_machine()}-abc"
    reused.mkdir()
    assert remove_stale_temps(tmp_path, ".out.tmp-") == [(reused, 0)]


def test_text_files_clear_their_stale_temporaries(tmp_path, sleeper):
    stale = tmp_path / f".plan.json.tmp-{sleeper.tag}abc"
    stale.write_text("half a plan")
    live = tmp_path / f".plan.json.tmp-{_tag(psutil.Process())}abc"
    live.write_text("being written")
    sleeper.stop()
    write_text_atomic(tmp_path / "plan.json", "{}")
    assert (tmp_path / "plan.json").read_text() == "{}"
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["plan.json", live.name])


def test_the_cache_and_replaced_outputs_clear_what_killed_runs_left(tmp_path, sleeper):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale_fill = cache / f".tmp-{sleeper.tag}abc"  # a conversion killed midway
    stale_fill.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    stale_backup = tmp_path / f".out.old-{sleeper.tag}abc"  # killed while removing a backup
    stale_backup.mkdir()
    sleeper.stop()

    target = into_cache(cache / "model", lambda tmp: (tmp / "config.json").write_text("{}"), "m")
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["model"]

    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("the new output")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]
