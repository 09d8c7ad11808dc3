"""Shared fixtures: a tiny random Llama built in code (no network, no GPU, seconds to build)."""

import copy
import os
import tempfile

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the app's workspaces go to a folder of this test run, never into the user's own
os.environ["MKA_STUDIO_WORKSPACES"] = tempfile.mkdtemp(prefix="mka-test-workspaces-")


@pytest.fixture(scope="session")
def tiny():
    """A LoadedModel of tiny:llama (6 layers, d_model 64, 4 heads over 2 KV groups). Read-only.
    In fp32 (the CPU default is bf16): the unit tests check arithmetic exactly."""
    from mka_core.models.loading import load_model

    return load_model("tiny:llama", device="cpu", dtype="fp32", seed=0)


@pytest.fixture()
def tiny_copy(tiny):
    """A private deep copy for tests that modify the model."""
    return copy.deepcopy(tiny)


@pytest.fixture(scope="session")
def tiny_batch(tiny):
    from mka_core.data.corpus import builtin_corpus, make_calibration

    calib, _ = builtin_corpus()
    return make_calibration(tiny.tokenizer, calib, n_samples=24, max_tokens=32)


@pytest.fixture(scope="session")
def bundled():
    """The real SmolLM2-135M (integration tests only)."""
    from mka_core.models.loading import load_model

    return load_model("bundled:smollm2-135m", device="cpu")
