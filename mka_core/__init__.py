"""MKA Studio's library: load a causal LM, capture per-layer activations, measure how similar its
layers are, plan and apply layer merges (MKA) or intra-module pruning (TransAct), and evaluate."""

__version__ = "0.1.0"
