"""Real processes a reliability test can kill: a redis-server on a directory it owns, restartable on the
same directory and port (so an append-only file is replayed as after a crash)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    def __init__(self, directory, port: int | None = None, appendonly: bool = True):
        self.binary = shutil.which("redis-server")
        assert self.binary, "redis-server not found: bash scripts/system-deps.sh installs it"
        self.directory, self.port, self.appendonly = str(directory), port or free_port(), appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        import redis

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory, "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout_s
        while True:  # bounded wait for PING (an AOF replay may take a moment), then fail loudly
            try:
                if client.ping():
                    client.close()
                    return self
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                assert self.process.poll() is None, "redis-server exited at start"
                assert time.monotonic() < deadline, f"redis-server did not answer PING within {timeout_s} s"
                time.sleep(0.01)

    def kill(self) -> None:
        """kill -9: no shutdown, no final save; what survives is what the AOF already had."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def redis_process(tmp_path):
    started = []

    def make(appendonly: bool = True, port: int | None = None) -> RedisProcess:
        process = RedisProcess(tmp_path / f"redis-{len(started)}", port, appendonly)
        (tmp_path / f"redis-{len(started)}").mkdir()
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()
