"""`longbow serve` as an operator runs it: a real process, the real model, Ray shards; SIGTERM stops it
cleanly and promptly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from longbow.services.client.sdk import LongbowClient

pytestmark = pytest.mark.slow


def _read_port(process: subprocess.Popen, limit_lines: int = 200) -> int:
    for _ in range(limit_lines):  # stdout blocks until the server prints its address (or dies)
        line = process.stdout.readline()
        if not line:
            break
        match = re.search(r"serving .* on [\d.]+:(\d+)", line)
        if match:
            return int(match.group(1))
    raise AssertionError(f"server did not start (exit code {process.poll()})")


@pytest.mark.parametrize("shards", [0, 2])
def test_serve_answers_then_stops_on_sigterm(shards):
    env = {**os.environ, "LONGBOW_PORT": "0"}
    command = [sys.executable, "-m", "longbow.services.cli", "serve", "--no-metrics", "--shards", str(shards)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        port = _read_port(process)
        with LongbowClient(f"127.0.0.1:{port}", timeout_s=120) as client:
            result = client.generate("The sky is", max_tokens=4, min_tokens=4)
        assert result.completion_tokens == 4
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
