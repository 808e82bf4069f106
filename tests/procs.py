"""Real processes for the end-to-end tier: `gradwatch serve` and `gradwatch worker` on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args], cwd=ROOT, env={**os.environ, **env},
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill_group(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 20) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


def start_server(env: dict[str, str], log_dir: Path, *extra: str, port: int | None = None) -> tuple[Proc, str]:
    """`port`: a fixed one (to restart a server where its clients expect it); default a free one."""
    port = port or free_port()
    log = log_dir / f"serve-{port}.log"
    if log.exists():  # a restart on the same port: keep the first run's log
        log = log_dir / f"serve-{port}-{int(time.time() * 1000)}.log"
    proc = Proc(["serve", "--host", "127.0.0.1", "--port", str(port), *extra], env, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"gradwatch serve exited {proc.popen.returncode}:\n{proc.output()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.stop()
    raise RuntimeError(f"gradwatch serve did not become ready:\n{proc.output()}")


def start_worker(env: dict[str, str], log_dir: Path, name: str) -> Proc:
    return Proc(["worker", "--id", name, "--threads", "1"], env, log_dir / f"worker-{name}.log")


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
