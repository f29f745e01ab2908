#!/usr/bin/env bash
# One entry point for people and CI:
#   ./run.sh            run the proxy (the demo when no UPSTREAM_BASE_URL is configured)
#   ./run.sh web        the same under mitmweb, to watch flows live
#   ./run.sh test       lint, type-check and run the test suite
#   ./run.sh <command>  any `routstr` command, e.g. ./run.sh keys create --balance-sats 1000
# It installs what is missing first: uv (with pip), then the locked dependencies in .venv.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# A Python >= 3.12 interpreter, 3.12 first (every dependency has wheels for it): $UV_PYTHON,
# then python3.12 on PATH or under pyenv, then anything newer.
find_python() {
    local candidates=("${UV_PYTHON:-}" python3.12) v
    if command -v pyenv >/dev/null 2>&1; then
        for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$' | sort -rV); do
            candidates+=("$(pyenv root)/versions/$v/bin/python3")
        done
        candidates+=(python3.13)
        for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[3-9]\.[0-9]+$' | sort -V); do
            candidates+=("$(pyenv root)/versions/$v/bin/python3")
        done
    fi
    # pyenv's folder even when pyenv is not on PATH
    local root=${PYENV_ROOT:-$HOME/.pyenv}
    candidates+=("$root"/versions/3.12.*/bin/python3 python3.13 "$root"/versions/3.1[3-9].*/bin/python3 python3)
    local c
    for c in "${candidates[@]}"; do
        [ -n "$c" ] || continue
        if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
            "$c" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 1
}

# uv itself: on PATH if it runs, else installed with the default pip.
find_uv() {
    if uv --version >/dev/null 2>&1; then echo uv; return; fi
    local py
    for py in python3 "$PYTHON"; do
        if "$py" -m uv --version >/dev/null 2>&1; then echo "$py -m uv"; return; fi
    done
    say "installing uv with pip"
    python3 -m pip install --quiet --user uv >/dev/null 2>&1 || python3 -m pip install --quiet uv >&2
    echo "python3 -m uv"
}

PYTHON=$(find_python) || { echo "Python 3.12 or newer is needed (set UV_PYTHON to one)" >&2; exit 1; }
UV=$(find_uv)
if [ ! -x .venv/bin/routstr ] || [ uv.lock -nt .venv/.synced ] || [ pyproject.toml -nt .venv/.synced ]; then
    say "installing dependencies into .venv"
    $UV sync --frozen --python "$PYTHON" >&2
    touch .venv/.synced
fi

# What the tests drive that is not Python: Debian's Chromium (the /admin browser tests), tor (the
# hidden-service torrc), docker-compose (compose.yml is validated), curl (the README's commands) and
# Node.js with npm (cashu-ts, the interop tests in tests/js; Node 20.19 or newer).
# Installed with apt-get when missing; elsewhere, install them yourself.
need_system_packages() {
    local need=() sudo=""
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
    command -v tor >/dev/null 2>&1 || need+=(tor)
    command -v curl >/dev/null 2>&1 || need+=(curl)
    command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
    [ ${#need[@]} -gt 0 ] || return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        say "the tests need: ${need[*]} (no apt-get here: install them, then run this again)"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "installing ${need[*]} (Debian packages the tests drive)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q "${need[@]}" >/dev/null \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "${need[@]}" >/dev/null; }
}

cmd=${1:-serve}
[ $# -gt 0 ] && shift
case "$cmd" in
    test)
        need_system_packages
        say "ruff"; .venv/bin/ruff check routstr_addon cli tests bench example.py
        say "mypy"; .venv/bin/mypy
        say "pytest"; exec .venv/bin/pytest "$@"
        ;;
    web) exec .venv/bin/routstr serve --web "$@" ;;
    serve) exec .venv/bin/routstr serve "$@" ;;
    *) exec .venv/bin/routstr "$cmd" "$@" ;;
esac
