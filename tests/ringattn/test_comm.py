"""Emulated transport: same semantics as the real one, counts bytes, fails instead of hanging."""

from __future__ import annotations

import time

import pytest
import torch

from longbow.ringattn.comm import CommCounter, run_emulated


def test_exchange_delivers_and_counts_posted_bytes() -> None:
    def rank_fn(transport, payload):
        peer = (transport.rank + 1) % transport.world_size
        source = (transport.rank - 1) % transport.world_size
        buffer = torch.empty(4)
        handle = transport.exchange("step 0", [(peer, payload), (peer, torch.empty(0))], [(source, buffer), (source, torch.empty(0))])
        transport.wait(handle)
        return buffer

    counters = [CommCounter() for _ in range(3)]
    payloads = [torch.full((4,), float(r)) for r in range(3)]
    received = run_emulated(rank_fn, payloads, counters)
    assert [b[0].item() for b in received] == [2.0, 0.0, 1.0]
    assert all(c.bytes_by_step() == {"step 0": (16, 16)} for c in counters)  # empty tensors are not sent


def test_all_to_all_and_collectives() -> None:
    def rank_fn(transport, _):
        chunks = [torch.tensor([10 * transport.rank + j]) for j in range(transport.world_size)]
        got = transport.all_to_all("a2a", chunks)
        total = transport.all_reduce("sum", torch.tensor([float(transport.rank)]), "sum")
        return [t.item() for t in got], total.item(), transport.all_gather_ints("ints", [transport.rank])

    results = run_emulated(rank_fn, [None] * 3)
    assert results[1] == ([1, 11, 21], 3.0, [[0], [1], [2]])


def test_missing_message_times_out_instead_of_hanging() -> None:
    def rank_fn(transport, _):
        if transport.rank == 0:
            transport.wait(transport.exchange("step 0", [], [(1, torch.empty(1))]))  # rank 1 never sends

    with pytest.raises(TimeoutError):
        run_emulated(rank_fn, [None, None], timeout_s=0.5)


def test_failing_rank_releases_the_others() -> None:
    def rank_fn(transport, _):
        if transport.rank == 1:
            raise ValueError("boom")
        transport.all_gather_ints("setup", [0])  # would wait forever for rank 1

    start = time.monotonic()
    with pytest.raises(ValueError, match="boom"):
        run_emulated(rank_fn, [None, None], timeout_s=30)
    assert time.monotonic() - start < 10  # released by the abort, not by the 30 s timeout
