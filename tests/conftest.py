"""Shared fixtures: one tiny random Qwen3-VL checkpoint per test session, built through the real loader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A data folder holding the tiny checkpoint (built once per run)."""
    from chat.engine.loader import TINY_RANDOM, build_tiny_random

    data = tmp_path_factory.mktemp("data")
    build_tiny_random(data / "models" / TINY_RANDOM)
    return data


@pytest.fixture(scope="session")
def loaded(model_dir):
    """Processor and model loaded with `from_pretrained`, as the app does."""
    from chat.engine.loader import load

    return load("tiny-random", model_dir)
