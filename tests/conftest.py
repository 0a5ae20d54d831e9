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
    from chat.engine.local.loader import TINY_RANDOM, build_tiny_random

    data = tmp_path_factory.mktemp("data")
    build_tiny_random(data / "models" / TINY_RANDOM)
    return data


@pytest.fixture(scope="session")
def loaded(model_dir):
    """Processor and model loaded with `from_pretrained`, as the app does."""
    from chat.engine.local.loader import load

    return load("tiny-random", model_dir)


CHROMIUM = os.environ.get("VLCHAT_CHROMIUM", "/usr/bin/chromium")
# Debian's chromium, headless, with no background traffic (this machine has no network).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """One headless Debian chromium per test module, driven by Playwright."""
    from playwright import sync_api as playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}; run tests/run.sh, which installs it")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
