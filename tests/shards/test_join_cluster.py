"""`longbow serve` joining a Ray cluster that is already running, as an operator does: `ray start --head`
in its own process on loopback, then `longbow serve --shards 2 --address ...` with the GCS address
(how a gateway inside the cluster joins, `--address auto` there) and with a `ray://` client address
(development from outside the cluster). Both answer with the same tokens as one process, and the shards
hold the cluster's CPUs while they serve."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from longbow.services.client.sdk import LongbowClient
from longbow.services.config import EngineConfig, LongbowConfig, ModelSource
from longbow.services.engine.types import SamplingParams
from longbow.services.replica import build_engine

pytestmark = pytest.mark.slow

PROMPT = [504, 2365, 6354, 16438, 260, 5214, 690]
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # as tests/conftest.py pins it for this process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A 2-CPU Ray head in its own process group; every port its own, so other Rays on the machine are
    left alone. Yields (GCS address, ray:// address)."""
    gcs_port, client_port = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="lbray", dir="/tmp")  # short: Ray's unix socket paths have a limit
    ports = {name: _free_port() for name in ("dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                             "runtime-env-agent-port")}
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
               "--num-cpus=2", "--include-dashboard=false", "--object-store-memory=100000000",
               "--disable-usage-stats", f"--temp-dir={temp_dir}", *(f"--{k}={v}" for k, v in ports.items())]
    # NOTE: the head's client proxy starts a server process per ray:// client and gives up when its channel
    # is not ready within 30 s (Ray's default); late in the full suite on 2 loaded cores that start took
    # longer once ("Starting Ray client server failed"), so the head waits up to 120 s.
    env = {**RAY_ENV, "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "120"}
    head = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        for line in head.stdout:  # blocks until Ray reports it started (or the process ends)
            if "Ray runtime started" in line:
                break
        else:
            raise AssertionError(f"ray start --head failed (exit code {head.poll()})")
        yield f"127.0.0.1:{gcs_port}", f"ray://127.0.0.1:{client_port}"
    finally:
        head.send_signal(signal.SIGTERM)  # --block: ray start stops what it started
        try:
            head.wait(timeout=30)
        finally:
            try:
                os.killpg(head.pid, signal.SIGKILL)  # whatever of its own group outlived it
            except ProcessLookupError:
                pass
            shutil.rmtree(temp_dir, ignore_errors=True)


def _read_port(process: subprocess.Popen, log: Path) -> int:
    for line in process.stdout:  # blocks until the server prints its address (or dies)
        match = re.search(r"serving .* on [\d.]+:(\d+)", line)
        if match:
            return int(match.group(1))
    tail = log.read_text(errors="replace")[-3000:]
    raise AssertionError(f"server did not start (exit code {process.wait()}); its stderr ends:\n{tail}")


def _cluster_cpus_free(address: str) -> float:
    import ray

    assert not ray.is_initialized()
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        return ray.available_resources().get("CPU", 0.0)
    finally:
        ray.shutdown()


@pytest.mark.parametrize("kind", ["gcs", "ray_client"])
def test_serve_joins_a_running_cluster(ray_head, tiny_checkpoint, tiny_model, kind, tmp_path):
    gcs_address, client_address = ray_head
    address = gcs_address if kind == "gcs" else client_address
    model = ModelSource(name_or_path=str(tiny_checkpoint), device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=6, min_tokens=6)
    [reference] = build_engine(LongbowConfig(model=model, engine=EngineConfig(num_blocks=64)),
                               tiny_model).generate([PROMPT], params)
    env = {**RAY_ENV, "LONGBOW_PORT": "0", "LONGBOW_MODEL": str(tiny_checkpoint), "LONGBOW_DEVICE": "cpu",
           "LONGBOW_DTYPE": "float32", "LONGBOW_NUM_BLOCKS": "64", "LONGBOW_PLACEMENT_STRATEGY": "PACK"}
    command = [sys.executable, "-m", "longbow.services.cli", "serve", "--no-metrics", "--shards", "2",
               "--address", address]
    log = tmp_path / "serve.stderr"
    with open(log, "w") as stderr:
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                  cwd=Path(__file__).parent)
    try:
        port = _read_port(server, log)
        with LongbowClient(f"127.0.0.1:{port}", timeout_s=120) as client:
            result = client.generate(token_ids=PROMPT, max_tokens=6, min_tokens=6)
        assert result.token_ids == reference.token_ids
        assert _cluster_cpus_free(gcs_address) == 0  # both shards sit on the cluster's 2 CPUs
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        # The stopped server's shards give the cluster its CPUs back (Ray ends the actors asynchronously:
        # a bounded poll, so the next test does not find the cluster still full).
        deadline = time.monotonic() + 60
        while _cluster_cpus_free(gcs_address) < 2:
            assert time.monotonic() < deadline, "the shards of a stopped server still hold the cluster's CPUs"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
