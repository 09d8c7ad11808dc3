"""Widgets the pages share: picking layer pairs on the heatmaps, the evaluation settings form,
a run's before/after section, the export form, and the stability note beside a heatmap."""

from __future__ import annotations

import streamlit as st

from mka_core.errors import MkaInputError
from mka_core.evaluation.generation import DEFAULT_PROMPTS
from mka_core.figures.runs import before_after_figure
from mka_core.figures.tables import (
    before_after_table,
    fmt_mb,
    fmt_num,
    fmt_params,
    fmt_pct,
    task_table,
)
from mka_core.ui import actions, exports, guards, session
from mka_core.ui import state as S
from mka_core.ui.resources import eval_defaults


def heatmap_chart_key(measure: str) -> str:
    return f"heatmap_{measure}"


def absorb_heatmap_clicks() -> tuple[int, int] | None:
    """Turn a new click on any heatmap into the chosen pair (moving the layer selectors).
    A click on two layers that are not neighbours is kept pending: the page asks what is
    meant (see `pending_pair_choice`). Run before the selectors are drawn: a widget's value may
    only be set before it exists."""
    seen = st.session_state.setdefault(S.CLICKS_SEEN, {})
    for measure in S.MEASURES:
        key = heatmap_chart_key(measure)
        points = _selected_points(st.session_state.get(key))
        if not points:
            seen.pop(key, None)
            continue
        p = points[-1]
        pair = (int(round(float(p["y"]))), int(round(float(p["x"]))))
        if seen.get(key) == pair:
            continue
        seen[key] = pair
        if pair[0] == pair[1]:
            continue  # the diagonal: a layer with itself says nothing
        a, b = sorted(pair)
        st.session_state[S.W_PAIR_A] = a
        st.session_state[S.W_PAIR_B] = b
        st.session_state[S.PAIR] = (a, b)
        if b - a > 1:
            st.session_state[S.PENDING_PAIR] = (a, b)
        session.save_state()
    return st.session_state.get(S.PAIR)


def _selected_points(state) -> list:
    if not state:
        return []
    try:
        selection = state["selection"]
        return list(selection["points"] or [])
    except (KeyError, TypeError):
        return []


def init_pair_selectors(n_layers: int) -> None:
    """Give the layer selectors the chosen pair (kept when the user comes back to the page:
    Streamlit forgets a widget's value when its page is left), else the middle of the model."""

    def ok(x) -> bool:
        return isinstance(x, int) and 0 <= x < n_layers

    a, b = st.session_state.get(S.W_PAIR_A), st.session_state.get(S.W_PAIR_B)
    if ok(a) and ok(b):
        return
    pair = st.session_state.get(S.PAIR)
    if pair and ok(pair[0]) and ok(pair[1]):
        st.session_state[S.W_PAIR_A], st.session_state[S.W_PAIR_B] = pair
        return
    mid = max(0, min(n_layers - 2, n_layers // 2))
    st.session_state[S.W_PAIR_A] = mid
    st.session_state[S.W_PAIR_B] = min(mid + 1, n_layers - 1)


def set_pair(a: int, b: int) -> None:
    """The pair chosen with the selectors, kept in the session and the workspace."""
    pair = (min(a, b), max(a, b))
    if st.session_state.get(S.PAIR) != pair:
        st.session_state[S.PAIR] = pair
        session.save_state()


def pending_pair_choice(sim) -> None:
    """Ask what a click on two non-adjacent layers means, and say what each choice does."""
    pending = st.session_state.get(S.PENDING_PAIR)
    if not pending:
        return
    a, b = pending
    span = b - a + 1
    with st.container(border=True):
        st.markdown(
            f"**Layers {a} and {b} are not neighbours.** A merge takes consecutive layers, so "
            f"this pick would touch all **{span} layers {a}–{b}**. What do you mean?"
        )
        c1, c2, c3 = st.columns(3)
        if c1.button(
            f"Merge all {span} layers {a}–{b} into one",
            key="pending_merge",
            help=f"One output layer, the mean of layers {a}..{b} (equal weights): "
            f"{span - 1} layers fewer.",
        ):
            _take(pair_picks((a, b), "merge"))
        if c2.button(
            f"Drop layers {a}–{b}",
            key="pending_drop",
            help=f"Remove all {span} layers: {span} layers fewer.",
        ):
            _take(pair_picks((a, b), "drop"))
        if c3.button("Only look (add nothing)", key="pending_look"):
            st.session_state.pop(S.PENDING_PAIR, None)
            st.rerun()


def _take(pick: dict) -> None:
    st.session_state.pop(S.PENDING_PAIR, None)
    try:
        add_pick(pick)
        st.toast(f"Added: {describe_pick(pick)} (see the Plan page)")
    except MkaInputError as e:
        st.error(str(e))
    st.rerun()


def pair_picks(pair: tuple[int, int], op: str) -> dict:
    """A manual pick from a heatmap pair: the layers a..b (merges need consecutive layers)."""
    a, b = sorted(int(x) for x in pair)
    if op == "merge" and a == b:
        raise MkaInputError(f"a merge needs two different layers, got layer {a} twice")
    return {"op": op, "layers": list(range(a, b + 1))}


def add_pick(pick: dict) -> None:
    picks = st.session_state.setdefault(S.PICKS, [])
    if pick in picks:
        raise MkaInputError(f"{describe_pick(pick)} is already in the list")
    picks.append(pick)
    session.save_state()
    guards.sidebar_status()


def describe_pick(pick: dict) -> str:
    layers = pick["layers"]
    span = (
        f"layers {layers[0]}–{layers[-1]}"
        if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1))
        else "layers " + ", ".join(map(str, layers))
        if len(layers) > 1
        else f"layer {layers[0]}"
    )
    return f"{pick['op']} {span}"


def remove_pick(index: int) -> None:
    picks = st.session_state.setdefault(S.PICKS, [])
    if 0 <= index < len(picks):
        picks.pop(index)
    session.save_state()


def clear_picks() -> None:
    st.session_state[S.PICKS] = []
    session.save_state()


def stability_note(container, stability, measure: str) -> None:
    """One line beside a heatmap: how well its ranking reproduces on other rows."""
    if stability is None:
        container.caption("Stability: not measured (capture at least 32 samples).")
        return
    key = "bi" if measure == "bi" else measure
    rho = stability.score(key)
    colour = (
        "green"
        if rho is not None and rho >= 0.9
        else "orange"
        if rho is not None and rho >= 0.4
        else "red"
    )
    container.markdown(f":{colour}[**Stability:** {stability.reading(key)}]")


# ---------------------------------------------------------------------------------------------
# evaluation settings (Results and TransAct share them)


def eval_settings_form(key: str, submit_label: str, submit_key: str, extra=None):
    """The evaluation settings, in a form with one submit button: (settings, submitted, extra
    values). `extra()` may draw more inputs into the form first."""
    loaded = actions.current_model()
    d = eval_defaults(loaded)
    with st.form(f"{key}form"):
        extra_vals = extra() if extra else None
        c1, c2, c3, c4 = st.columns(4)
        budget = c1.number_input(
            "Evaluation tokens",
            256,
            65536,
            d["budget_tokens"],
            step=256,
            key=f"{key}eval_budget",
            help="The same held-out windows score both models (the built-in corpus's evaluation half).",
        )
        window = c2.number_input(
            "Window (tokens)", 16, 4096, d["window"], step=16, key=f"{key}eval_window"
        )
        with_speed = c3.checkbox(
            "Measure speed",
            d["with_speed"],
            key=f"{key}eval_speed",
            help="Prefill and decode tokens/s of both models (a minute or two on a CPU; the "
            "original's is measured once and reused).",
        )
        with_text = c4.checkbox(
            "Sample generations",
            True,
            key=f"{key}eval_generations",
            help=f"Greedy continuations of fixed prompts, {d['gen_tokens']} new tokens each.",
        )
        t1, t2 = st.columns(2)
        tasks = t1.text_input(
            "lm-eval tasks (optional)",
            key=f"{key}eval_tasks",
            placeholder="e.g. arc_easy,hellaswag",
            help="lm-evaluation-harness tasks, scored on both models with lm-eval's own "
            "Hugging Face wrapper. Hub tasks download their data; offline, give a folder of task "
            "YAMLs reading local files.",
        )
        tasks_dir = t2.text_input("lm-eval tasks folder (optional)", key=f"{key}eval_tasks_dir")
        submitted = st.form_submit_button(submit_label, type="primary", key=submit_key)
    settings = actions.eval_settings(
        budget, window, with_speed, with_text, tasks=tasks, tasks_dir=tasks_dir
    )
    return settings, submitted, extra_vals


def estimate_caption(settings) -> None:
    """Before a run on a CPU: about how long it will take, from the last run."""
    if actions.on_gpu():
        return
    est = actions.estimate_seconds(settings)
    if est is not None:
        st.caption(f"On this CPU a run with these settings took about {est:.0f} s last time.")
    else:
        st.caption(
            "On a CPU the first run also measures the original model (later runs reuse it); "
            "with these defaults it takes well under a minute on the bundled model."
        )


# ---------------------------------------------------------------------------------------------
# a run's before/after


def before_after_section(run, key: str = "") -> None:
    """A run's before/after table and chart, four headline metrics and the generations (each
    under its prompt)."""

    c1, c2 = st.columns([3, 2])
    with c1:
        st.table(before_after_table(run), hide_index=True, border="horizontal")
    with c2:
        st.plotly_chart(
            before_after_figure(run),
            key=f"{key}before_after_chart",
            config={"displayModeBar": False},
        )
    o, c = run.original, run.compressed
    m = st.columns(4)
    m[0].metric(
        "Perplexity",
        fmt_num(c.perplexity),
        f"{c.perplexity - o.perplexity:+.2f}",
        delta_color="inverse",
        delta_arrow="off",
    )
    m[1].metric("Top-1 agreement", fmt_pct(c.top1))
    m[2].metric(
        "Parameters",
        fmt_params(c.params),
        f"{100 * (c.params / o.params - 1):+.1f} %",
        delta_color="inverse",
        delta_arrow="off",
    )
    m[3].metric(
        "Decode speed", f"{fmt_num(c.decode_tps, 1)} tok/s" if c.decode_tps else "not measured"
    )
    if c.tasks:
        st.markdown("**lm-evaluation-harness**")
        st.table(task_table(o, c), hide_index=True, border="horizontal")
    skipped = (c.meta or {}).get("skipped") or {}
    if skipped:
        st.caption("Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    if o.generations and c.generations:
        st.markdown("**Generations** (greedy, the same prompts)")
        for prompt, a, b in zip(DEFAULT_PROMPTS, o.generations, c.generations):
            st.markdown(f"Prompt: `{prompt}`")
            left, right = st.columns(2)
            left.caption("original")
            right.caption(f"compressed: {run.label}")
            left.container(border=True).text(prompt + a)
            right.container(border=True).text(prompt + b)


# ---------------------------------------------------------------------------------------------
# export


def export_section(key: str = "", default_index: int | None = None) -> None:
    """Save a run's compressed model as a Hugging Face folder (shown as the full path it will
    be written to, in the workspace by default), then offer it as a zip."""
    runs = st.session_state.get(S.RUNS) or []
    if not runs:
        return
    default = len(runs) - 1 if default_index is None else default_index
    seen = st.session_state.get(S.WIDGET_OPTIONS, {}).get(f"{key}export_run")
    if seen != list(range(len(runs))) or f"{key}export_folder" not in st.session_state:
        st.session_state[f"{key}export_folder"] = exports.default_export_folder(default)
    S.follow_newest(f"{key}export_run", range(len(runs)), default)
    with st.form(f"{key}export_form"):
        c1, c2 = st.columns([1, 2])
        index = c1.selectbox(
            "Run",
            list(range(len(runs))),
            format_func=lambda i: f"{i + 1}: {runs[i].label}",
            key=f"{key}export_run",
        )
        folder = c2.text_input(
            "Output folder",
            key=f"{key}export_folder",
            help="A relative path is taken inside this workspace's exports folder.",
        )
        c3, c4 = st.columns([1, 2])
        dtype_name = c3.selectbox(
            "Weights dtype",
            list(exports.OUT_DTYPES),
            key=f"{key}export_dtype",
            help="The source's dtype by default (bf16 for a GGUF, whose dequantised values have "
            "no float type of their own); fp32 doubles the folder's size.",
        )
        overwrite = c4.checkbox(
            "Replace the folder if it exists", False, key=f"{key}export_overwrite"
        )
        gguf_name = st.selectbox(
            "Also as a GGUF file (for llama.cpp)",
            list(exports.GGUF_CHOICES),
            key=f"{key}export_gguf",
            help="Written into the folder as model-<type>.gguf, tensor by tensor, with the "
            "tokenizer. Q8_0 keeps perplexity within about 1 %; Q4_0 is a quarter of bf16's "
            "size and costs more (see the Compare page's quantized rows).",
        )
        do_export = st.form_submit_button("Export", key=f"{key}export_submit")
    try:
        st.caption(f"Will be written to `{exports.resolve_folder(folder)}`")
    except MkaInputError:
        pass
    if do_export:
        try:
            with S.progress_status("Saving the model, shard by shard") as progress:
                path, gguf_path = exports.export_run(
                    index,
                    folder,
                    overwrite=overwrite,
                    out_dtype=exports.OUT_DTYPES[dtype_name],
                    progress=progress,
                    gguf=exports.GGUF_CHOICES[gguf_name],
                )
            st.success(f"Saved to {path}" + (f" and {gguf_path.name}" if gguf_path else ""))
        except MkaInputError as e:
            st.error(str(e))
    done = st.session_state.get(S.EXPORTS, {})
    if index in done:
        data = exports.folder_zip(done[index])
        if data is None:
            st.caption(
                f"The folder is too large for a download here; it is on this machine at "
                f"`{done[index]}`."
            )
        else:
            st.download_button(
                f"Download {done[index]} as .zip ({fmt_mb(len(data))})",
                data,
                file_name=f"{runs[index].label.replace(' ', '_')}.zip",
                mime="application/zip",
                key=f"{key}dl_model_zip",
            )


# ---------------------------------------------------------------------------------------------
# tables of runs (the Results history and the Compare sweep)

NUMBER_COLUMNS = {  # row field → (column title, printf format)
    "params": ("params", "%d"),
    "params_removed_pct": ("params removed %", "%.1f"),
    "perplexity": ("perplexity", "%.3f"),
    "perplexity_original": ("original ppl", "%.3f"),
    "perplexity_half_a": ("half a", "%.3f"),
    "perplexity_half_b": ("half b", "%.3f"),
    "kl": ("KL", "%.4f"),
    "top1": ("top-1", "%.3f"),
    "decode_tps": ("decode tok/s", "%.1f"),
    "seconds": ("seconds", "%.1f"),
    "plan_s": ("plan s", "%.1f"),
    "gguf_bytes": ("GGUF bytes", "%d"),
}


def rows_table(frame, key: str) -> None:
    """A data frame of runs with the shared number formats of its known columns."""
    st.dataframe(
        frame,
        hide_index=True,
        key=key,
        column_config={
            col: st.column_config.NumberColumn(title, format=fmt)
            for col, (title, fmt) in NUMBER_COLUMNS.items()
            if col in frame
        },
    )
