"""Child processes of the benchmark: each in its own session (process group), all stopped at
the end whatever happens, with their output in a log file."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Proc", "Processes", "busy_seconds", "cpu_seconds", "free_port", "memory_kb",
           "own_and_children_seconds", "read_line", "wait_port"]


@dataclass(slots=True)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Starts processes in new sessions and stops every one of them (and its group)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, stdout_pipe: bool = False) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(cmd), env=dict(env) if env is not None else None, cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log, stderr=log,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after ``timeout``; returns the exit code."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout)
        # Anything the leader left behind in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.popen.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as e:  # keep stopping the others
                print(f"warning: could not stop {proc.name} (pid {proc.pid}): {e}")


def read_line(proc: Proc, timeout: float) -> str:
    """The first line a process prints on its stdout pipe."""
    assert proc.popen.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.popen.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"{proc.name} printed nothing in {timeout:.0f} s\n"
                                   + proc.log_tail())
            data = os.read(proc.popen.stdout.fileno(), 4096)
            if not data:
                raise RuntimeError(f"{proc.name} exited (code {proc.popen.wait()}):\n"
                                   + proc.log_tail())
            buf += data
    return buf.split(b"\n", 1)[0].decode().strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(proc: Proc, port: int, timeout: float = 30.0) -> None:
    """Wait until ``proc`` accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited (code {proc.popen.returncode}) before "
                               f"listening on port {port}:\n{proc.log_tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} is not listening on port {port} after {timeout:.0f} s:\n"
                       + proc.log_tail())


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (nan when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def busy_seconds() -> float:
    """CPU time all cores spent on anything but idle and I/O wait, since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def own_and_children_seconds() -> float:
    """CPU time of this process and its reaped children (wrk, load workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
