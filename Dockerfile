# syntax=docker/dockerfile:1
# The Routstr proxy: mitmdump in reverse mode with the addon, as a non-root user.
#   docker build -t routstr .
#   docker run -p 8000:8000 --env-file .env -v routstr-data:/data routstr
# compose.yml runs it with a Tor hidden service. Settings: .env.example; the ledger and the
# wallet's data live in /data (DATA_DIR).

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# --- build: the locked dependencies, then the project, into /app/.venv ---------------------
FROM python:3.12-slim-bookworm AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /app
COPY pyproject.toml uv.lock README.md LICENSE ./
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev --no-install-project
COPY routstr_addon ./routstr_addon
COPY cli ./cli
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev
COPY models.example.json ./
COPY docker/entrypoint.sh ./docker/entrypoint.sh

# --- run ------------------------------------------------------------------------------------
FROM python:3.12-slim-bookworm
# uid/gid 10001: docker/tor/Dockerfile gives tor this group, so the proxy can read the hidden
# service's hostname file (and nothing else of tor's).
RUN groupadd --gid 10001 routstr \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin routstr \
    && install -d -o routstr -g routstr -m 0750 /data
COPY --from=build /app /app
WORKDIR /app
ENV PATH="/app/.venv/bin:$PATH" PYTHONUNBUFFERED=1 DATA_DIR=/data \
    LISTEN_HOST=0.0.0.0 LISTEN_PORT=8000
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
# Liveness: /health answers while the process serves. compose.yml checks readiness (/ready)
# instead, which also fails while the ledger, the mint, the rate or the upstream is away.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LISTEN_PORT', '8000') + '/health', timeout=4)"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
