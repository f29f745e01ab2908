#!/bin/sh
# The image's entry point: mitmdump in reverse mode with the Routstr addon, listening on
# LISTEN_HOST:LISTEN_PORT (0.0.0.0:8000). The reverse target is UPSTREAM_BASE_URL's origin (the
# addon adds its path). With no UPSTREAM_BASE_URL it runs `routstr serve`: the providers of
# PROVIDERS_PATH (or OPENAI_API_KEY…) if any, else the demo.
# Arguments go to mitmdump, e.g. `--set termlog_verbosity=warn`.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
host=${LISTEN_HOST:-0.0.0.0}
port=${LISTEN_PORT:-8000}
upstream=${UPSTREAM_BASE_URL:-}
if [ -z "$upstream" ]; then
    # No shorthand: `routstr serve` serves PROVIDERS_PATH / OPENAI_API_KEY… if set, else the demo.
    exec routstr serve --listen-host "$host" --listen-port "$port"
fi
scheme=${upstream%%://*}
rest=${upstream#*://}
exec mitmdump --mode "reverse:$scheme://${rest%%/*}" --listen-host "$host" \
    --listen-port "$port" -s "$here/routstr_addon/addon.py" "$@"
