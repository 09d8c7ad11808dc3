"""Analysis: per-layer activations, manifold embeddings, layer similarity (NPIB, cosine, angular, CKA, Block Influence) and how stable each measure is."""
