"""Text for calibration and evaluation: the built-in corpus, user files, calibration batches and evaluation windows (stage 1: needs nothing but the base modules)."""
