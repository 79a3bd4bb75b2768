"""Real processes for the queue tests: redis-server, ``opmri-node serve`` and ``worker``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tests.node_fixtures import free_port

REPO = Path(__file__).resolve().parent.parent


def redis_binary() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        raise AssertionError("redis-server is not installed (Debian package redis-server)")
    return path


class RedisServer:
    """A redis-server on loopback; restartable on the same port, with or without its data."""

    def __init__(self, folder: Path, *, persistent: bool = False) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.folder), "--save", ""]
        args += ["--appendonly", "yes" if self.persistent else "no"]
        self.process = subprocess.Popen(
            args, stdout=(self.folder / "redis.log").open("ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.ping():
                return
            if self.process.poll() is not None:
                raise AssertionError("redis-server exited: " + self.log())
            time.sleep(0.05)
        raise AssertionError("redis-server did not answer: " + self.log())

    def log(self) -> str:
        return (self.folder / "redis.log").read_text(errors="replace")[-3000:]

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: whatever was not persisted is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None


LIVE: list[OpmriProcess] = []
"""Every process started here; :func:`stop_all` ends those a failed test left running."""


def stop_all() -> None:
    while LIVE:
        process = LIVE.pop()
        if process.process.poll() is None:
            process.kill()


class OpmriProcess:
    """``python -m opmri_node <args>`` with its output in a log file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        LIVE.append(self)
        self.args = args
        self.log_path = log_path
        self._log = log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TCP_NODELAY": "1",
               "OMP_NUM_THREADS": "1"}
        env.pop("OPMRI_CONFIG", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "opmri_node", *args], cwd=REPO,
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )

    @staticmethod
    def command(*args: str) -> list[str]:
        """The command line of ``opmri-node <args>`` in this virtual environment."""
        return [sys.executable, "-m", "opmri_node", *args]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 120.0, *, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log()[after:]:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited ({self.process.returncode}):\n"
                                     + self.log()[-4000:])
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged in time:\n" + self.log()[-4000:])

    def pool_children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        for child in self.pool_children():
            child.kill()
        self.process.kill()
        self.process.wait(30)

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return int(self.process.returncode)


def start_serve(config: Path, log: Path) -> OpmriProcess:
    node = OpmriProcess(["-v", "serve", "--config", str(config)], log)
    node.wait_log("ready on ")
    return node


def start_worker(config: Path, log: Path, queues: str, *extra: str) -> OpmriProcess:
    worker = OpmriProcess(["-v", "worker", "--config", str(config), "--queues", queues,
                           *extra], log)
    worker.wait_log("worker ready", timeout=120)
    return worker


def jobs(db: Path) -> list[dict[str, Any]]:
    """The jobs table (read with a plain connection, as an operator would)."""
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=10) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM jobs ORDER BY id")]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
