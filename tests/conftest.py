"""Shared fixtures: offline, a private model cache, and models built once per test session."""
import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
# One intra-op thread: on a busy 2-core machine torch's spinning worker threads make these small
# models hundreds of times slower; with one thread the results are the same and fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Presets and synthetic data are cached under the repository's pytest cache (fresh in CI's
# clean checkout); their folder names change with their recipes, so a stale one is never used.
os.environ.setdefault("PRERESQ_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "preresq"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The `tiny` preset (format warm-up included): (model, tokenizer, image_processor) on the CPU."""
    import preresq
    from harness import presets

    return preresq.load_model(presets.model_path("tiny"), "cpu")


@pytest.fixture(scope="session")
def blank_dir():
    """A `tiny`-architecture checkpoint without the warm-up (random weights), as a folder."""
    from harness import presets

    path = Path(tempfile.mkdtemp(prefix="preresq-blank-")) / "model"
    torch.manual_seed(0)
    presets.build_preset("tiny", path, warmup_steps=0)
    return path


@pytest.fixture(scope="session")
def blank(blank_dir):
    import preresq

    return preresq.load_model(str(blank_dir), "cpu")
