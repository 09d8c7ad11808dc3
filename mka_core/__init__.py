"""MKA Studio's library: load a causal LM, capture per-layer activations, measure how similar its
layers are, plan and apply layer merges (MKA) or intra-module pruning (TransAct), and evaluate."""

import os

# Ask torch's CPU allocator for transparent huge pages on large tensors (read once, when torch is
# first imported; without effect if it already was). Fresh memory costs a page fault per 4 KB
# otherwise: on this machine that made reading a 436 MB block into new memory 6x slower.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
