"""The entry point as a user meets it: --help, a model that cannot load, /health while loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from chat.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def run_app(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_help_lists_every_setting_with_its_environment_variable():
    out = run_app("--help").stdout
    for flag, env in [("--model", "VLCHAT_MODEL"), ("--data-dir", "VLCHAT_DATA_DIR"), ("--port", "VLCHAT_PORT"),
                      ("--max-waiting", "VLCHAT_MAX_WAITING"), ("--auth", "VLCHAT_AUTH")]:
        assert flag in out and env in out
    assert "Qwen/Qwen3-VL-8B-Instruct" in out  # defaults are shown


def test_flags_beat_environment_beat_defaults(tmp_path):
    s = load_settings(["--port", "9001"], {"VLCHAT_PORT": "9000", "VLCHAT_MAX_WAITING": "3",
                                            "VLCHAT_DATA_DIR": str(tmp_path)})
    assert (s.port, s.max_waiting, s.data_dir, s.host) == (9001, 3, tmp_path, "0.0.0.0")


def test_missing_model_folder_ends_with_advice_not_a_traceback(tmp_path):
    result = run_app("--model", str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path / "d"),
                     "--host", "127.0.0.1", "--port", "0")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "--model tiny-random" in result.stderr
    assert "Traceback" not in result.stderr


def test_clamp_params_bounds(tmp_path):
    s = load_settings([], {"VLCHAT_DATA_DIR": str(tmp_path)})
    p = s.clamp_params(9.0, -1.0, 10**9)
    assert (p.temperature, p.top_p, p.max_new_tokens) == (2.0, 0.01, s.max_new_tokens_limit)
    p = s.clamp_params(None, None, None)
    assert p.max_new_tokens == s.default_max_new_tokens


def test_uncached_hub_model_offline_fails_fast_with_advice(tmp_path):
    result = run_app("--model", "Qwen/Qwen3-VL-8B-Instruct", "--data-dir", str(tmp_path / "d"),
                     "--host", "127.0.0.1", "--port", "0", timeout=60)
    assert result.returncode == 2
    assert "not in the local cache" in result.stderr and "hf download" in result.stderr
    assert "Traceback" not in result.stderr


def test_health_is_503_until_the_model_is_ready_then_200(tmp_path):
    from fastapi.testclient import TestClient

    import app as entry

    settings = load_settings(["--model", "tiny-random", "--data-dir", str(tmp_path)], {})
    web, ctx, store = entry.create_app(settings)
    with TestClient(web) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert client.get("/metrics").status_code == 200
        server = type("S", (), {"should_exit": False})()
        entry.start_engine(settings, store, ctx, server)
        assert ctx.engine.ready.wait(60)
        ready = client.get("/health")
        assert ready.status_code == 200 and ready.json() == {"status": "ok", "model": "tiny-random", "waiting": 0,
                                                             "phase": "ready", "progress": None}
        assert "vlchat_images_encoded_total 0.0" in client.get("/metrics").text  # warm-up is not counted
        assert client.get("/vlchat.db").status_code == 404
        ctx.engine.shutdown()
    store.close()


def test_malformed_auth_is_refused_with_a_clear_message(tmp_path):
    result = run_app("--auth", "justaname", "--data-dir", str(tmp_path), "--model", "tiny-random", timeout=60)
    assert result.returncode == 2 and "user:password" in result.stderr and "Traceback" not in result.stderr


def test_a_start_failure_of_any_kind_ends_the_process_with_advice(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without the device that is asked for")
    result = run_app("--device", "cuda", "--model", "tiny-random", "--data-dir", str(tmp_path), "--host", "127.0.0.1",
                     "--port", "0", timeout=120)
    assert result.returncode == 2
    assert "vlchat could not start" in result.stderr and "--device" in result.stderr
    assert "Traceback" not in result.stderr
