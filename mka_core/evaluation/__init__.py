"""Evaluation: perplexity, KL, top-1, size, speed, generations and MMLU of a model against its original."""
