"""App responsiveness: how long the Streamlit app takes to re-render the similarity page from
its cache and to switch pages, measured with streamlit.testing.v1.AppTest on app.py and pages/
(bench/results/app.csv). AppTest runs the scripts in this process without a browser, so these are
the server-side script times: what the user waits for before the browser starts drawing.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from .common import REPO, Settings, say, write_csv

COLUMNS = ["action", "page", "repeat", "seconds", "exception"]


def _pages() -> dict[str, str]:
    """Home and every page of pages/, in sidebar order, named by their file."""
    pages = {"home": "app.py"}
    for p in sorted((REPO / "pages").glob("*.py")):
        pages[p.stem.split("_", 1)[-1].lower()] = f"pages/{p.name}"
    return pages


def _pick(options, word: str) -> str:
    for o in options:
        if word.lower() in str(o).lower():
            return o
    raise RuntimeError(f"no option containing {word!r} among {list(options)}")


def _require(at, key: str, what: str) -> None:
    """Stop with the page's own messages when a step did not do what it should have."""
    if key not in at.session_state:
        shown = [e.value for e in at.error] + [str(e.value) for e in at.exception]
        raise RuntimeError(f"app: {what} did not work: {shown or 'no message in the page'}")


def run(settings: Settings, out: Path) -> dict:
    from streamlit.testing.v1 import AppTest

    from mka_core import ui

    t_section = time.perf_counter()
    pages = _pages()
    rows: list[dict] = []

    def timed(action: str, page: str, fn, repeat: int = 0):
        t0 = time.perf_counter()
        at = fn()
        dt = time.perf_counter() - t0
        errors = [str(e.value)[:200] for e in at.exception]
        rows.append(
            {
                "action": action,
                "page": page,
                "repeat": repeat,
                "seconds": dt,
                "exception": "; ".join(errors) or None,
            }
        )
        say(f"app: {action} ({page}) {dt:.2f} s{' EXCEPTION ' + errors[0] if errors else ''}")
        write_csv(out / "app.csv", rows, COLUMNS)
        return at

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=900)
    timed("first render", "home", at.run)
    at.switch_page(pages["model"])
    timed("open", "model", at.run)
    radio = at.radio(key="model_source_kind")
    tiny = settings.model.startswith("tiny:")
    radio.set_value(_pick(radio.options, "tiny" if tiny else "bundled")).run()
    timed("load model", "model", at.button(key="model_load").click().run)
    _require(at, ui.MODEL_SPEC, "loading the model")

    at.switch_page(pages["similarity"])
    timed("open (no analysis yet)", "similarity", at.run)
    at.number_input(key="calib_samples").set_value(settings.app_calib_samples)
    at.number_input(key="calib_tokens").set_value(settings.app_calib_tokens)
    timed("capture + similarity", "similarity", at.button(key="capture_run").click().run)
    _require(at, ui.ANALYSIS, "capturing activations")
    for r in range(settings.app_repeats):
        timed("re-render from cache", "similarity", at.run, repeat=r)

    at.switch_page(pages["plan"])
    timed("open", "plan", at.run)
    at.slider(key="plan_n_remove").set_value(min(settings.budgets))
    timed("make a plan (mka, budget)", "plan", at.button(key="plan_make").click().run)
    _require(at, ui.PLAN, "making a plan")

    # "Run the plan" with the Results page's own defaults (on a CPU: 1024 evaluation tokens,
    # no speed timing, the sample generations): the first run also measures the original,
    # the second reuses it
    at.switch_page(pages["results"])
    timed("open", "results", at.run)
    timed(
        "run the plan, app defaults (first run)", "results", at.button(key="run_plan").click().run
    )
    _require(at, ui.RUNS, "running the plan")
    timed("run the plan, app defaults (again)", "results", at.button(key="run_plan").click().run)

    # every page, several rounds: the first visit may compute (and cache) its figures
    order = [p for p in pages if p != "similarity"] + ["similarity"]
    for r in range(settings.app_repeats + 1):
        for page in order:
            at.switch_page(pages[page])
            timed("switch to", page, at.run, repeat=r)

    summary = {}
    for page in order:
        later = [
            row["seconds"]
            for row in rows
            if row["action"] == "switch to" and row["page"] == page and row["repeat"] > 0
        ]
        if later:
            summary[page] = round(statistics.median(later), 3)
    runs = {
        row["action"]: round(row["seconds"], 1)
        for row in rows
        if row["action"].startswith("run the plan")
    }
    return {
        "run_plan_s": runs,
        "run_plan_target_s": 30,
        "wall_s": round(time.perf_counter() - t_section, 1),
        "model": settings.model,
        "calibration": f"{settings.app_calib_samples} x {settings.app_calib_tokens}",
        "switch_median_s": summary,
        "exceptions": sum(1 for r in rows if r["exception"]),
    }
