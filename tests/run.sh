#!/usr/bin/env bash
# The test command: bash tests/run.sh [pytest args]
#
# Works on a bare Debian 12 machine (as root, or with sudo) and reuses whatever is already
# there, so running it again is quick: installs Debian's chromium (the browser tests drive
# it; Playwright's own browser downloads are never used), node and npm (a client test) and
# python3-venv when missing,
# creates .venv when missing, installs requirements-dev.txt into it, then runs ruff and
# pytest. CPU only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
export VLCHAT_CHROMIUM=/usr/bin/chromium

apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then
            sudo=(sudo -n)
        else
            echo "tests/run.sh: need root (or sudo) to install: $*" >&2
            exit 1
        fi
    fi
    echo "tests/run.sh: installing $* with apt-get" >&2
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q "$@"
}

if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium fonts-dejavu-core
fi

# node and npm run the Vercel AI SDK against the API (tests/test_api_vercel.py installs it with npm ci).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_install nodejs npm
fi

if [ ! -x .venv/bin/python ]; then
    # Debian's python3 cannot make a virtualenv without python3-venv (ensurepip).
    if ! command -v python3 >/dev/null || ! python3 -c "import ensurepip" >/dev/null 2>&1; then
        apt_install python3 python3-venv
    fi
    python3 -m venv .venv
fi

# Already-satisfied requirements are not fetched again. The first run downloads torch
# (the CUDA build, which also runs on CPU): a few GB.
.venv/bin/pip install -q -r requirements-dev.txt

.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
