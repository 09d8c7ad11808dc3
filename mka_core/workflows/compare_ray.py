"""The Ray executor of `compare`: each config a Ray task with its resources declared (one GPU
where the cluster has GPUs, else one CPU); the model is loaded once per worker process and the
analysis, evaluation windows and the original's reference states go to the object store once."""

from __future__ import annotations

import socket

from mka_core.errors import MkaInputError, report
from mka_core.models.loading import load_model
from mka_core.workflows.sweep import Config, row_brief, run_config


def check_ray_address(address: str) -> None:
    """A quick one-line refusal when a Ray head does not answer (ray.init would wait long)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://")[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or hostport, int(port or 6379)), timeout=3):
            pass
    except (OSError, ValueError):
        raise MkaInputError(
            f"Ray address {address!r} does not answer (no Ray head listening there); start one "
            f"with `ray start --head` or leave --address out to run locally"
        ) from None


def _ray_task(spec: dict, analysis, cfg: Config, windows, cache: dict, kw: dict) -> dict:
    """One config in a Ray worker: the model is loaded there (once per worker process)."""

    key = tuple(sorted(spec.items()))
    loaded = _WORKER_MODELS.get(key)
    if loaded is None:
        loaded = load_model(**spec)
        _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = loaded
    row, _ = run_config(loaded, analysis, cfg, windows, cache, **kw)
    return row


_WORKER_MODELS: dict = {}


def run_ray(loaded, analysis, configs, windows, cache, kw, address, progress) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise MkaInputError(
            "the Ray executor needs the ray package (pip install ray); or use --executor local"
        ) from None
    started = False
    if not ray.is_initialized():
        ray.init(
            address=None if address in (None, "local") else address,
            log_to_driver=False,
            include_dashboard=False,
        )
        started = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
        spec = {
            "source": loaded.source,
            "device": "cuda" if gpus >= 1 else loaded.device,
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "offload": loaded.streamed,
        }
        task = ray.remote(**resources)(_ray_task)
        # the reference states once in the object store, not once per task
        shared = [ray.put(x) for x in (analysis, windows, cache)]
        refs = [task.remote(spec, shared[0], cfg, shared[1], shared[2], kw) for cfg in configs]
        rows = []
        for i, ref in enumerate(refs):
            try:
                rows.append(ray.get(ref))
            except BaseException:
                for r in refs[i + 1 :]:
                    ray.cancel(r, force=True)
                raise
            report(
                progress,
                (i + 1) / len(refs),
                f"compare (ray): {configs[i].label}: {row_brief(rows[-1])}",
            )
        return rows
    finally:
        if started:
            ray.shutdown()
