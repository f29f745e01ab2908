"""The Docker files, without a Docker engine: hadolint passes, docker-compose validates
compose.yml (and its parts agree with the Dockerfile and the torrc), and the image's entry point
and health check, run here as the image would run them, serve ``/v1/info``."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from routstr_addon.ledger import Ledger

from .conftest import BIN, MODELS, ROOT, Output
from .upstream import TestUpstream

IMAGE_ROOT = "/app"  # WORKDIR of the image: the repository's root there


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, args = line.partition(" ")
            out.append((name.upper(), args.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    return steps[last_from:]


def image_env(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in final_stage(dockerfile):
        if name == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def exec_form(dockerfile: Path, instruction: str) -> list[str]:
    [args] = [a for n, a in final_stage(dockerfile) if n == instruction]
    if instruction == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4:]
    parsed = json.loads(args)
    assert isinstance(parsed, list)
    return [str(a) for a in parsed]


def local(path: str) -> str:
    """A path inside the image, in this checkout."""
    return str(ROOT / Path(path).relative_to(IMAGE_ROOT)) if path.startswith(IMAGE_ROOT) else path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- lint and structure -----------------------------------------------------------------------


def test_hadolint_passes() -> None:
    for dockerfile in (ROOT / "Dockerfile", ROOT / "docker" / "tor" / "Dockerfile"):
        result = subprocess.run([str(BIN / "hadolint"), str(dockerfile)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_non_root_with_what_it_copies() -> None:
    dockerfile = ROOT / "Dockerfile"
    steps = instructions(dockerfile)
    assert sum(1 for name, _ in steps if name == "FROM") >= 2  # multi-stage
    assert any(name == "RUN" and "uv sync --frozen --no-dev" in a for name, a in steps)
    user = [a for name, a in final_stage(dockerfile) if name == "USER"]
    assert user and not user[-1].startswith(("0", "root"))
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text()
               .splitlines() if line.strip() and not line.startswith("#")}
    for name, args in steps:
        if name == "COPY" and "--from" not in args:
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.split("/")[0] not in ignored, f"{source} is in .dockerignore"
    assert os.access(local(exec_form(dockerfile, "ENTRYPOINT")[0]), os.X_OK)


def test_compose_config_is_valid_and_agrees_with_the_images(tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is missing (./run.sh test installs Debian's)"
    for name in ("compose.yml", "Dockerfile", "docker"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())  # the README's step
    result = subprocess.run([compose, "-f", "compose.yml", "config"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    proxy, tor = config["services"]["routstr"], config["services"]["tor"]
    assert tor["network_mode"] == "service:routstr"
    torrc = dict(line.split(None, 1) for line in (ROOT / "docker" / "tor" / "torrc").read_text()
                 .splitlines() if line.strip() and not line.startswith("#"))

    def mount(service: dict[str, Any], volume: str) -> tuple[str, str]:
        [found] = [v for v in service["volumes"] if v.startswith(f"{volume}:")]
        _, target, mode = found.split(":")
        return target, mode

    # The proxy reads the hostname file tor writes, through the shared volume, read-only.
    tor_dir, _ = mount(tor, "tor-hs")
    proxy_dir, mode = mount(proxy, "tor-hs")
    assert mode == "ro"
    hs_dir = torrc["HiddenServiceDir"]
    assert proxy["environment"]["ONION_HOSTNAME_FILE"] == (
        proxy_dir + hs_dir.removeprefix(tor_dir) + "/hostname")
    assert mount(proxy, "routstr-data")[0] == proxy["environment"]["DATA_DIR"] == "/data"
    # Tor forwards to the port the image listens on, and the proxy reaches tor's SOCKS port.
    port = image_env(ROOT / "Dockerfile")["LISTEN_PORT"]
    assert torrc["HiddenServicePort"] == f"80 127.0.0.1:{port}"
    assert proxy["ports"][0].endswith(f":{port}:{port}/tcp")
    socks = proxy["environment"]["TOR_PROXY_URL"]
    assert socks == f"socks5h://{torrc['SocksPort']}"


# --- the entry point, run here ----------------------------------------------------------------


@pytest.fixture
def image_like(tmp_path: Path, upstream: TestUpstream) -> dict[str, str]:
    """The environment the image gives the entry point, pointing at the test upstream."""
    (tmp_path / "models.json").write_text(json.dumps(MODELS))
    return {**image_env(ROOT / "Dockerfile"), "PATH": f"{BIN}:{os.environ['PATH']}",
            "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "data"),
            "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(free_port()),
            "UPSTREAM_BASE_URL": f"{upstream.url}/v1", "MODELS_PATH": str(tmp_path / "models.json"),
            "BTC_USD_PRICE": "90000"}


def run_entrypoint(env: dict[str, str], cwd: Path) -> Iterator[Output]:
    cmd = [local(part) for part in exec_form(ROOT / "Dockerfile", "ENTRYPOINT")]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = Output(proc)
        output.wait_for(rf"listening at .*:{env['LISTEN_PORT']}")
        yield output
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


def test_the_entrypoint_runs_mitmdump_with_the_addon_and_is_healthy(
        image_like: dict[str, str], tmp_path: Path, upstream: TestUpstream) -> None:
    base = f"http://127.0.0.1:{image_like['LISTEN_PORT']}"
    for output in run_entrypoint(image_like, tmp_path):
        assert f"reverse proxy to {upstream.url}" in output.text  # mitmdump, in reverse mode
        info = httpx.get(f"{base}/v1/info", timeout=10)
        assert info.status_code == 200 and info.json()["name"] == "Routstr Proxy"
        health = subprocess.run(exec_form(ROOT / "Dockerfile", "HEALTHCHECK"),
                                env={**image_like, "PATH": f"{BIN}:{os.environ['PATH']}"},
                                capture_output=True, text=True, timeout=30)
        assert health.returncode == 0, health.stderr
        ready = subprocess.run(compose_healthcheck(), env=image_like, capture_output=True,
                               text=True, timeout=30)
        assert ready.returncode == 0, ready.stderr
        assert httpx.get(f"{base}/ready", timeout=10).json()["status"] == "ready"
        ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'routstr.sqlite'}")
        key, _ = ledger.create_key(10_000)
        ledger.close()
        paid = httpx.post(f"{base}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                          json={"model": "test/model",
                                "messages": [{"role": "user", "content": "docker"}]}, timeout=10)
        assert paid.status_code == 200 and int(paid.headers["x-routstr-cost-msats"]) > 0
    # Stopped: the health check fails.
    stopped = subprocess.run(exec_form(ROOT / "Dockerfile", "HEALTHCHECK"), env=image_like,
                             capture_output=True, timeout=30)
    assert stopped.returncode != 0


def compose_healthcheck() -> list[str]:
    """The compose file's health check of the proxy (readiness), as a command to run here."""
    config = yaml.safe_load((ROOT / "compose.yml").read_text())
    test = [str(part) for part in config["services"]["routstr"]["healthcheck"]["test"]]
    assert test[0] == "CMD"
    return test[1:]


def test_the_dockerfile_checks_liveness_and_compose_checks_readiness() -> None:
    assert "/health'" in " ".join(exec_form(ROOT / "Dockerfile", "HEALTHCHECK"))
    assert "/ready'" in " ".join(compose_healthcheck())


@pytest.mark.skipif(shutil.which("tor") is None, reason="tor is not installed")
def test_the_torrc_publishes_the_proxy_whose_info_shows_the_onion(
        image_like: dict[str, str], tmp_path: Path) -> None:
    """Tor (no network) with the repository's torrc, paths moved here: it writes the hidden
    service's hostname file, which the proxy reads and shows in /v1/info."""
    torrc = (ROOT / "docker" / "tor" / "torrc").read_text()
    data, hs_root = tmp_path / "tor-data", tmp_path / "tor-hs"
    data.mkdir(mode=0o700)
    hs_root.mkdir(mode=0o750)
    torrc = (torrc.replace("/var/lib/tor-hs", str(hs_root)).replace("/var/lib/tor", str(data))
             .replace("SocksPort 127.0.0.1:9050", f"SocksPort 127.0.0.1:{free_port()}")
             .replace("127.0.0.1:8000", f"127.0.0.1:{image_like['LISTEN_PORT']}"))
    (tmp_path / "torrc").write_text(torrc + "DisableNetwork 1\n")
    tor = subprocess.Popen(["tor", "-f", str(tmp_path / "torrc")], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        hostname = hs_root / "routstr" / "hostname"
        deadline = time.monotonic() + 30
        while not hostname.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        onion = hostname.read_text().strip()
        assert re.fullmatch(r"[a-z2-7]{56}\.onion", onion)
        assert oct(hostname.stat().st_mode & 0o777) == "0o640"  # its group (the proxy) reads it
        env = {**image_like, "ONION_HOSTNAME_FILE": str(hostname)}
        for _ in run_entrypoint(env, tmp_path):
            info = httpx.get(f"http://127.0.0.1:{env['LISTEN_PORT']}/v1/info", timeout=10).json()
            assert info["onion_url"] == f"http://{onion}"
    finally:
        tor.terminate()
        tor.wait(15)
