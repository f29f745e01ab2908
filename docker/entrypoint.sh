#!/bin/sh
# The image's entry point: mitmdump in reverse mode with the Routstr addon, listening on
# LISTEN_HOST:LISTEN_PORT (0.0.0.0:8000). The reverse target is UPSTREAM_BASE_URL's origin (the
# addon adds its path). With no UPSTREAM_BASE_URL it runs the demo (`routstr serve`) instead.
# Arguments go to mitmdump, e.g. `--set termlog_verbosity=warn`.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
host=${LISTEN_HOST:-0.0.0.0}
port=${LISTEN_PORT:-8000}
upstream=${UPSTREAM_BASE_URL:-}
if [ -z "$upstream" ]; then
    echo "UPSTREAM_BASE_URL is not set: running the DEMO (echo model, no real money)" >&2
    exec routstr serve --listen-host "$host" --listen-port "$port"
fi
scheme=${upstream%%://*}
rest=${upstream#*://}
exec mitmdump --mode "reverse:$scheme://${rest%%/*}" --listen-host "$host" \
    --listen-port "$port" -s "$here/routstr_addon/addon.py" "$@"
