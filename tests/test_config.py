"""Settings as an operator meets them: bad values end start-up with one line, the README table matches --help,
and the container health check finds the port the server really listens on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from chat import healthcheck
from chat.config import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def run_app(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VLCHAT_")}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**clean, **(env or {})})


# -- start-up through app.py ----------------------------------------------------------------------


@pytest.mark.parametrize(("args", "env", "names", "allowed"), [
    ((), {"VLCHAT_PORT": "abc"}, "--port (VLCHAT_PORT)", "from 0 to 65535"),
    (("--port", "70000"), {}, "--port (VLCHAT_PORT)", "from 0 to 65535"),
    ((), {"VLCHAT_API_OPEN": "maybe"}, "--api-open (VLCHAT_API_OPEN)", "true/false"),
    (("--device", "foo"), {}, "--device (VLCHAT_DEVICE)", "cuda:N"),
    (("--max-waiting", "-1"), {}, "--max-waiting (VLCHAT_MAX_WAITING)", "at least 1"),
    ((), {"VLCHAT_LOG_LEVEL": "loud"}, "--log-level (VLCHAT_LOG_LEVEL)", "WARNING"),
])
def test_a_bad_setting_ends_start_up_with_one_line(tmp_path, args, env, names, allowed):
    result = run_app("--data-dir", str(tmp_path), "--model", "tiny-random", *args, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0] and allowed in lines[0]
    assert not any(tmp_path.iterdir())  # refused before anything was created


def test_an_unknown_flag_is_one_line_too():
    result = run_app("--prot", "8080")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vlchat could not start: unrecognized arguments: --prot 8080 (python app.py --help lists the options)"]


# -- the same rules through load_settings ---------------------------------------------------------


def bad(argv: list[str], env: dict | None = None) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(argv, env or {}, exit_on_error=False)
    return str(info.value)


@pytest.mark.parametrize(("argv", "env", "says"), [
    (["--port", "-1"], {}, "--port (VLCHAT_PORT) must be a whole number from 0 to 65535; got '-1'."),
    ([], {"VLCHAT_PORT": "8080.5"}, "--port (VLCHAT_PORT) must be a whole number from 0 to 65535; got '8080.5'."),
    ([], {"VLCHAT_PORT": "9" * 5000}, "--port (VLCHAT_PORT) must be a whole number"),  # past int()'s digit limit
    ([], {"VLCHAT_MAX_WAITING": "0"}, "--max-waiting (VLCHAT_MAX_WAITING) must be a whole number of at least 1"),
    (["--context-tokens", "100"], {}, "--context-tokens (VLCHAT_CONTEXT_TOKENS) must be a whole number of at "
                                      "least 256"),
    (["--max-image-bytes", "0"], {}, "--max-image-bytes (VLCHAT_MAX_IMAGE_BYTES)"),
    (["--max-body-bytes", "ten"], {}, "--max-body-bytes (VLCHAT_MAX_BODY_BYTES)"),
    (["--max-images-per-message", "-3"], {}, "--max-images-per-message (VLCHAT_MAX_IMAGES_PER_MESSAGE)"),
    (["--kv-cache-mb", "-1"], {}, "--kv-cache-mb (VLCHAT_KV_CACHE_MB) must be a whole number of at least 0"),
    (["--max-running", "0"], {}, "--max-running (VLCHAT_MAX_RUNNING) must be a whole number of at least 1"),
    ([], {"VLCHAT_MAX_RUNNING_PER_OWNER": "0"}, "--max-running-per-owner (VLCHAT_MAX_RUNNING_PER_OWNER)"),
    (["--max-batch-tokens", "8"], {}, "--max-batch-tokens (VLCHAT_MAX_BATCH_TOKENS)"),
    ([], {"VLCHAT_CPU_THREADS": "-2"}, "--cpu-threads (VLCHAT_CPU_THREADS) must be a whole number of at least 0"),
    (["--gradio-cache-hours", "0"], {}, "--gradio-cache-hours (VLCHAT_GRADIO_CACHE_HOURS)"),
    (["--header-timeout-seconds", "0"], {}, "--header-timeout-seconds (VLCHAT_HEADER_TIMEOUT_SECONDS)"),
    (["--login-failures-per-minute", "-5"], {}, "--login-failures-per-minute (VLCHAT_LOGIN_FAILURES_PER_MINUTE)"),
    ([], {"VLCHAT_EXPOSE_DOCS": "2"}, "--expose-docs (VLCHAT_EXPOSE_DOCS) must be one of 1/0, true/false, yes/no, "
                                      "on/off; got '2'."),
    ([], {"VLCHAT_COOKIE_SECURE": ""}, "--cookie-secure (VLCHAT_COOKIE_SECURE)"),
    (["--device", "cuda:"], {}, "--device (VLCHAT_DEVICE) must be auto, cpu, cuda or cuda:N"),
    (["--device", "gpu"], {}, "--device (VLCHAT_DEVICE)"),
    (["--log-level", "verbose"], {}, "--log-level (VLCHAT_LOG_LEVEL) must be one of DEBUG, INFO, WARNING, ERROR, "
                                     "CRITICAL"),
    (["--host", ""], {}, "--host (VLCHAT_HOST)"),
    (["--model", " "], {}, "--model (VLCHAT_MODEL) must be non-empty"),
    (["--data-dir", ""], {}, "--data-dir (VLCHAT_DATA_DIR) must be a folder path"),
    (["--auth", "justaname"], {}, "--auth (VLCHAT_AUTH) must be user:password"),
    ([], {"VLCHAT_AUTH": ":secret"}, "--auth (VLCHAT_AUTH) must be user:password"),
    ([], {"VLCHAT_AUTH": "user:"}, "--auth (VLCHAT_AUTH) must be user:password"),
    (["--api-key", ","], {}, "--api-key (VLCHAT_API_KEY)"),
    (["--api-key", "has space"], {}, "--api-key (VLCHAT_API_KEY)"),
])
def test_every_kind_of_bad_value_names_its_setting(argv, env, says):
    assert says in bad(argv, env)


def test_secrets_are_never_echoed():
    assert "hunter2" not in bad(["--auth", "nocolonhunter2"])
    assert "s3cret" not in bad(["--api-key", "s3cret key"])


def test_direct_construction_is_checked_too():
    with pytest.raises(SettingsError, match="--max-waiting"):
        Settings(max_waiting=0)
    with pytest.raises(SettingsError, match="--port"):
        Settings(port="8080")  # a string where a number belongs


def test_good_values_and_precedence():
    env = {"VLCHAT_API_OPEN": "Yes", "VLCHAT_EXPOSE_DOCS": "off", "VLCHAT_PORT": " 9000 ",
           "VLCHAT_MAX_BODY_BYTES": "50_000_000", "VLCHAT_LOG_LEVEL": "debug"}
    s = load_settings(["--device", "cuda:1", "--auth", "ann:pass:with:colons", "--port", "0"], env,
                      exit_on_error=False)
    assert (s.api_open, s.expose_docs, s.port, s.max_body_bytes, s.device, s.auth) == (
        True, False, 0, 50_000_000, "cuda:1", "ann:pass:with:colons")
    assert s.log_level.upper() == "DEBUG"
    for word, value in (("1", True), ("on", True), ("TRUE", True), ("0", False), ("no", False), ("False", False)):
        assert load_settings([], {"VLCHAT_COOKIE_SECURE": word}, exit_on_error=False).cookie_secure is value
    # A flag beats the variable, also for on/off settings.
    assert load_settings(["--no-api-open"], {"VLCHAT_API_OPEN": "1"}, exit_on_error=False).api_open is False
    assert load_settings(["--port", "9001"], {"VLCHAT_PORT": "abc"}, exit_on_error=False).port == 9001
    s = load_settings([], {}, exit_on_error=False)
    assert (s.gradio_cache_hours, s.max_message_chars, s.login_failures_per_minute) == (1, 100_000, 5)


def test_load_settings_exits_2_by_default(capsys):
    with pytest.raises(SystemExit) as info:
        load_settings(["--port", "x"], {})
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("vlchat could not start: --port (VLCHAT_PORT)")


# -- the README's configuration table is --help ---------------------------------------------------


def readme_rows() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`--"):
            rows[cells[0].split("`")[1]] = cells
    return rows


def test_readme_configuration_table_matches_the_settings():
    rows = readme_rows()
    flags = {"--" + f.name.replace("_", "-"): f for f in fields(Settings)}
    assert set(rows) == set(flags), set(rows) ^ set(flags)
    for flag, f in flags.items():
        _, env, default, meaning = rows[flag]
        assert env == f"`VLCHAT_{f.name.upper()}`", flag
        assert meaning == f.metadata["help"], flag
        if isinstance(f.default, bool):
            assert default == ("on" if f.default else "off"), flag
        elif f.default == "":
            assert default.startswith("(empty"), flag
        else:
            assert default == f"`{f.default}`", flag
    help_text = " ".join(run_app("--help").stdout.split())
    for f in fields(Settings):
        assert " ".join(f.metadata["help"].split()) in help_text, f.name


# -- the container's health check follows --port ------------------------------------------------


def cmdline(*argv: str) -> bytes:
    return b"".join(a.encode() + b"\0" for a in argv)


@pytest.mark.parametrize(("argv", "env", "url"), [
    (("python", "app.py"), {}, "http://127.0.0.1:8080/health"),
    (("python", "app.py"), {"VLCHAT_PORT": "9000"}, "http://127.0.0.1:9000/health"),
    (("/opt/venv/bin/python", "/app/app.py", "--port", "9100"), {"VLCHAT_PORT": "9000"},
     "http://127.0.0.1:9100/health"),
    (("python", "app.py", "--port=9200", "--model", "/models/x"), {}, "http://127.0.0.1:9200/health"),
    (("python", "app.py", "--host", "127.0.0.1", "--port", "81"), {}, "http://127.0.0.1:81/health"),
    (("python", "app.py", "--host", "::", "--port", "81"), {}, "http://[::1]:81/health"),
    (("python", "app.py", "--host", "10.1.2.3"), {}, "http://10.1.2.3:8080/health"),
    (("tini", "--", "python", "app.py", "--port", "7000"), {}, "http://127.0.0.1:7000/health"),
])
def test_health_url_follows_the_servers_flags_and_environment(argv, env, url):
    assert healthcheck.health_url(cmdline(*argv), env) == url


def test_health_check_asks_the_real_port(tmp_path):
    answers = {"/health": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(answers.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        proc_cmdline = tmp_path / "cmdline"
        proc_cmdline.write_bytes(cmdline("python", "app.py", "--port", str(port)))
        assert healthcheck.main(proc_cmdline, {}) == 0
        answers["/health"] = 503
        assert healthcheck.main(proc_cmdline, {}) == 1
        proc_cmdline.write_bytes(cmdline("python", "app.py", "--port", str(port + 1 if port < 65535 else 1)))
        assert healthcheck.main(proc_cmdline, {}) == 1  # nobody there
    finally:
        server.shutdown()


def test_health_check_module_runs_as_the_dockerfile_calls_it():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'HEALTHCHECK .*\n?.*"-m", "chat.healthcheck"', dockerfile)
    result = subprocess.run([sys.executable, "-m", "chat.healthcheck", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=30)
    assert result.returncode == 0 and "/proc/1/cmdline" in result.stdout


def test_docker_base_image_matches_the_torch_wheel_requirements_resolve_to():
    """The Dockerfile's CUDA base and torch series are the ones pip installs from requirements.txt here."""
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch build says nothing about the CUDA one")
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu[\d.]+$", dockerfile, re.M)
    series = re.search(r"^ARG TORCH_SERIES=(\d+)\.(\d+)\.\*$", dockerfile, re.M)
    assert base and series, "the Dockerfile must pin a CUDA base image and a torch series"
    assert ".".join(base.groups()) == ".".join(torch.version.cuda.split(".")[:2])
    assert ".".join(series.groups()) == ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert "-c /tmp/torch-constraint.txt -r requirements.txt" in dockerfile


def test_readme_downloads_with_hf_not_the_removed_huggingface_cli():
    readme = (ROOT / "README.md").read_text()
    assert "huggingface-cli download" not in readme  # huggingface-hub 1.x/2.x ships only `hf`
    assert "hf download Qwen/Qwen3-VL-8B-Instruct --local-dir" in readme
