"""A rolling update on one machine: two real `longbow serve` processes, the SDK balancing over both
(round_robin over an ipv4: two-address target, as over a headless Service's pods), a client sending a steady
stream of small requests while one gateway is drained (SIGTERM) and restarted on the same ports. Zero
failed requests, counted; both gateways, and the restarted one, served some (their Prometheus counters)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from longbow.services.client.sdk import LongbowClient, LongbowError, RetryPolicy
from tests.reliability.conftest import free_port

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
# Enough attempts to outlast a drain: a call refused by the draining replica is retried on the other.
RETRY = RetryPolicy(attempts=8, initial_backoff_s=0.05, max_backoff_s=0.5)


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # polling period of a bounded wait on an external process
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class GatewayProcess:
    """`longbow serve` on fixed ports (so a restart comes back where clients look for it)."""

    def __init__(self, directory, name: str):
        self.port, self.health_port, self.metrics_port = free_port(), free_port(), free_port()
        self.config = directory / f"{name}.toml"
        self.config.write_text(f"""
[engine]
token_budget = 64
[gateway]
port = {self.port}
health_port = {self.health_port}
metrics_port = {self.metrics_port}
shutdown_timeout_s = 5.0
replica_id = "{name}"
[rag]
data_dir = "{directory / name}"
""")
        self.log = directory / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> GatewayProcess:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "longbow.services.cli", "--config", str(self.config),
                                             "serve"], stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 180) -> None:
        _wait_for(lambda: self.process.poll() is not None or self._health() == SERVING, timeout, f"{self.config.stem}")
        assert self.process.poll() is None, self.log.read_text()[-3000:]

    def _health(self):
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="longbow.v1.Generation"), timeout=2).status
            except grpc.RpcError:
                return None

    def generations_served(self) -> int:
        """OK Generate calls this process answered (longbow_requests_total; restarts from 0 with the process)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        pattern = r'^longbow_requests_total\{([^}]*)\} ([0-9.e+]+)$'
        return int(sum(float(value) for labels, value in re.findall(pattern, text, re.M)
                       if "Generation/Generate\"" in labels and 'code="OK"' in labels))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class SteadyClient:
    """Small Generate calls back to back on one balanced client, on a thread; counts successes and failures."""

    def __init__(self, target: str):
        self.client = LongbowClient(target, timeout_s=30, retry=RETRY)
        self.ok, self.failures, self._stop = 0, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.generate("Say hi.", max_tokens=2)
                self.ok += 1
            except LongbowError as exc:
                self.failures.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()


def test_rolling_update_loses_no_request(tmp_path):
    stable, updated = GatewayProcess(tmp_path, "replica-a"), GatewayProcess(tmp_path, "replica-b")
    load = None
    try:
        stable.start(), updated.start()
        stable.wait_ready(), updated.wait_ready()
        load = SteadyClient(f"ipv4:127.0.0.1:{stable.port},127.0.0.1:{updated.port}")
        _wait_for(lambda: stable.generations_served() > 0 and updated.generations_served() > 0, 60,
                  "both replicas to serve")

        before = load.ok
        updated.process.send_signal(signal.SIGTERM)  # the rolling update takes replica-b down ...
        assert updated.process.wait(60) == 0, updated.log.read_text()[-3000:]
        during = load.ok
        updated.start().wait_ready()  # ... and brings it back on the same ports
        _wait_for(lambda: updated.generations_served() > 0, 60, "the restarted replica to get calls again")
        served_by_a = stable.generations_served()
        load.stop()

        assert load.failures == [], load.failures[:3]
        assert during > before, "requests kept succeeding while replica-b was down"
        assert load.ok >= served_by_a > 0
        print(f"rolling update: {load.ok} requests, 0 failed; replica-a served {served_by_a}")
    finally:
        if load is not None:
            load.stop()
        stable.stop(), updated.stop()
