"""Run a function on N real processes joined by a gloo process group on 127.0.0.1.

Processes are spawned (not forked), the port is picked by binding to port 0, every collective has a
timeout, and the parent gives up (killing its children) after `timeout_s`, so a broken schedule fails
the test instead of hanging it.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# NOTE: ranks outside a subgroup wait in the next collective while their peers run a whole batch of
# cases (tens of seconds on a loaded 2-core machine), so the timeout is generous; a hang still fails.
COLLECTIVE_TIMEOUT_S = 180


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_processes(fn: Callable, world_size: int, *args: Any, timeout_s: float = 400.0) -> list[Any]:
    """fn(rank, world_size, *args) on world_size spawned processes; returns results in rank order.

    fn must be importable (module level). Raises RuntimeError with the first rank's traceback.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [
        context.Process(target=_worker, args=(rank, world_size, port, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, payload = results.get(timeout=timeout_s)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            collected[rank] = payload
    except queue.Empty:
        raise RuntimeError(f"ranks {sorted(set(range(world_size)) - set(collected))} timed out") from None
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [collected[rank] for rank in range(world_size)]
