"""Model page: choose a source, device and dtype; load with progress; a summary card."""

import streamlit as st

from mka_core import ui
from mka_core.errors import MkaInputError

ui.page_setup("Model", ":material/memory:")
ui.explain(
    "The model whose layers we compare. A *decoder-only* language model is a stack of identical "
    "blocks (attention + MLP); each block reads the hidden state of the one before and adds to "
    "it. MKA's question: are some neighbouring blocks doing nearly the same thing, so that one "
    "merged block could replace them? Start with the **bundled** SmolLM2-135M (a real model, "
    "30 blocks) or the **tiny** random model (6 blocks, instant, meaningless numbers)."
)

SOURCES = {
    "Bundled SmolLM2-135M-Instruct": "bundled",
    "Tiny random model (instant demo)": "tiny",
    "Local model folder": "folder",
    "GGUF file": "gguf",
    "Hugging Face hub id": "hub",
}

kind = SOURCES[st.radio("Source", list(SOURCES), key="model_source_kind", horizontal=True)]
PATH_LABELS = {
    "folder": ("Model folder", "~/models/Qwen2-0.5B (config.json + *.safetensors)"),
    "gguf": ("GGUF file", "~/models/model.Q8_0.gguf"),
    "hub": ("Hub id", "HuggingFaceTB/SmolLM2-360M (needs network, or the transformers cache)"),
}
with st.form("model_form"):
    path = ""
    if kind in PATH_LABELS:
        label, placeholder = PATH_LABELS[kind]
        path = st.text_input(
            label,
            key=f"model_path_{kind}",
            placeholder=placeholder,
            help="A folder needs config.json and *.safetensors weights; pickle is never read.",
        )
    c1, c2, c3, c4 = st.columns(4)
    device = c1.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="model_device")
    dtype = c2.selectbox(
        "dtype",
        ["auto", "bfloat16", "float32", "float16"],
        key="model_dtype",
        help="auto: bf16 (on this kind of CPU bf16 measured 2.6-2.9x faster than fp32, with the "
        "perplexity within 0.05 %; see BENCHMARKS.md), bf16 or fp16 on a GPU.",
    )
    weights = c3.selectbox(
        "Weights",
        list(ui.OFFLOAD_CHOICES),
        key="model_offload",
        help="auto: in memory when the weights take at most 40 % of the available memory, else "
        "streamed from disk one block at a time (slower, but a model larger than memory works).",
    )
    seed = c4.number_input("Seed (tiny model)", 0, 10_000, 0, key="model_seed")
    submitted = st.form_submit_button("Load model", type="primary", key="model_load")

if submitted:
    source = {"bundled": ui.DEFAULT_SOURCE, "tiny": ui.TINY_SOURCE}.get(kind, path)
    try:
        if kind in ("folder", "gguf", "hub") and not path.strip():
            raise MkaInputError("type a folder path, a .gguf file path or a hub id for this source")
        with ui.progress_status(f"Loading {source}") as progress:
            ui.load_model(
                source,
                device=device,
                dtype=dtype,
                seed=int(seed),
                progress=progress,
                offload=ui.OFFLOAD_CHOICES[weights],
            )
    except MkaInputError as e:
        st.error(str(e))

loaded = ui.current_model()
if loaded is None:
    st.info("No model loaded yet: pick a source above and press **Load model**.")
    st.stop()

s = ui.model_summary(loaded)
with st.container(border=True):
    st.subheader(s.source)
    st.caption(f"{s.architecture} · model type `{s.model_type}` · fingerprint `{s.fingerprint}`")
    c = st.columns(4)
    c[0].metric("Layers", s.n_layers)
    c[1].metric("Hidden size", s.d_model)
    c[2].metric("Heads (query / KV)", f"{s.n_heads} / {s.n_kv_heads}")
    c[3].metric("MLP size", s.intermediate_size)
    c = st.columns(4)
    c[0].metric("Parameters", ui.fmt_params(s.n_params))
    c[1].metric("Memory", ui.fmt_mb(s.n_bytes))
    c[2].metric("Device", s.device)
    c[3].metric("dtype", s.dtype)
    st.caption(f"Weights: {s.residency}.")
if s.streamed:
    st.info(
        "This model is **streamed from disk**: each forward pass reads it block by block, so "
        "captures and evaluations take longer, speed and sample text are skipped, and healing "
        "(which trains every weight in memory) is not available."
    )
if not ui.on_gpu(loaded):
    st.warning(
        "Running on the **CPU**: everything works, but capture and evaluation are slower, so "
        "the pages use lighter defaults (fewer samples and evaluation tokens) than on a GPU."
    )
if s.source.startswith("tiny:"):
    st.info("This is a *random* tiny model: use it to learn the flow; its numbers mean nothing.")
st.page_link(
    "pages/2_Similarity.py",
    label="Next: capture activations and compare layers",
    icon=":material/arrow_forward:",
)
