"""How ranks talk: one Transport interface, a torch.distributed backend and an emulated one.

Every schedule in ringattn is written once against `Transport`: post an exchange (point-to-point
sends and receives into preallocated buffers), compute, wait. `DistTransport` maps that onto
`torch.distributed.batch_isend_irecv` (gloo on CPU, NCCL on CUDA). `EmulatedTransport` runs N logical
ranks as N threads of one process with in-memory mailboxes, so the same schedule code, step for
step, runs in fast tests and on a single GPU.

Both record the same `CommCounter`: payload bytes sent and received per rank per step, plus the time
spent blocked waiting. Point-to-point messages are counted from the tensors actually posted.
Collectives are counted by the algorithm a ring implementation would run (documented per method),
since gloo and NCCL pick their own algorithms and do not report bytes.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Message:
    """One logged transfer. kind: "p2p" or the collective's name; peer is -1 for collectives."""

    step: str
    kind: str
    peer: int
    sent: int
    received: int


@dataclass
class CommCounter:
    """Per-rank log of payload bytes per step and of time blocked in waits."""

    messages: list[Message] = field(default_factory=list)
    wait_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def record(self, step: str, kind: str, peer: int, sent: int, received: int) -> None:
        self.messages.append(Message(step, kind, peer, sent, received))

    def bytes_by_step(self) -> dict[str, tuple[int, int]]:
        """step -> (bytes sent, bytes received), in first-seen step order."""
        totals: dict[str, list[int]] = {}
        for message in self.messages:
            entry = totals.setdefault(message.step, [0, 0])
            entry[0] += message.sent
            entry[1] += message.received
        return {step: (sent, received) for step, (sent, received) in totals.items()}

    def total(self) -> tuple[int, int]:
        return sum(m.sent for m in self.messages), sum(m.received for m in self.messages)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes each rank sends (and receives) in a ring allreduce: reduce-scatter then all-gather."""
    return 2 * (world_size - 1) * nbytes // world_size


class Transport(ABC):
    """Point-to-point exchanges and the few collectives the schedules need, for one rank."""

    rank: int
    world_size: int
    counter: CommCounter | None

    def exchange(
        self, step: str, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]]
    ) -> Any:
        """Post sends (peer, tensor) and receives (peer, buffer); returns a handle for `wait`.

        Empty tensors are skipped: both ends know every size, so they skip the same messages.
        Messages between one pair of ranks are matched in posting order.
        """
        sends = [(peer, t) for peer, t in sends if t.numel() > 0]
        recvs = [(peer, t) for peer, t in recvs if t.numel() > 0]
        if self.counter is not None:
            for peer, tensor in sends:
                self.counter.record(step, "p2p", peer, _nbytes(tensor), 0)
            for peer, tensor in recvs:
                self.counter.record(step, "p2p", peer, 0, _nbytes(tensor))
        return step, self._post(sends, recvs)

    def wait(self, handle: Any) -> None:
        step, inner = handle
        start = time.perf_counter()
        self._wait(inner)
        if self.counter is not None:
            self.counter.wait_s[step] += time.perf_counter() - start

    def all_gather_ints(self, step: str, values: Sequence[int]) -> list[list[int]]:
        """Every rank's list of ints (same length on all ranks). Counted as (N-1) copies each way."""
        local = torch.tensor(list(values), dtype=torch.int64)
        gathered = self._all_gather(local)
        if self.counter is not None:
            nbytes = (self.world_size - 1) * _nbytes(local)
            self.counter.record(step, "all_gather", -1, nbytes, nbytes)
        return [t.tolist() for t in gathered]

    def all_gather(self, step: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (same shape on all ranks), counted as (N-1) copies each way."""
        gathered = self._all_gather(tensor.contiguous())
        if self.counter is not None:
            nbytes = (self.world_size - 1) * _nbytes(tensor)
            self.counter.record(step, "all_gather", -1, nbytes, nbytes)
        return gathered

    def all_reduce(self, step: str, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """Elementwise "sum" or "max" over ranks (returns a new tensor), counted as a ring allreduce."""
        reduced = self._all_reduce(tensor.contiguous(), op)
        if self.counter is not None:
            nbytes = ring_allreduce_bytes(_nbytes(tensor), self.world_size)
            self.counter.record(step, "all_reduce", -1, nbytes, nbytes)
        return reduced

    def all_to_all(self, step: str, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """chunks[j] goes to rank j; returns what every rank sent here (same shape as chunks[rank]).

        Built from point-to-point messages, so it runs on both transports; logged as "all_to_all".
        """
        received = [torch.empty_like(chunks[self.rank]) for _ in range(self.world_size)]
        received[self.rank] = chunks[self.rank].clone()
        peers = [j for j in range(self.world_size) if j != self.rank]
        sends = [(j, chunks[j].contiguous()) for j in peers if chunks[j].numel() > 0]
        recvs = [(j, received[j]) for j in peers if received[j].numel() > 0]
        self._wait(self._post(sends, recvs))
        if self.counter is not None:
            sent = sum(_nbytes(t) for _, t in sends)
            self.counter.record(step, "all_to_all", -1, sent, sum(_nbytes(t) for _, t in recvs))
        return received

    @abstractmethod
    def _post(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> Any: ...

    @abstractmethod
    def _wait(self, inner: Any) -> None: ...

    @abstractmethod
    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...

    @abstractmethod
    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor: ...


def setup_lengths(transport: Transport, length: int, known: list[int] | None) -> list[int]:
    """Every rank's length of one block: `known` when the caller has them (every rank derives them from
    the same plan), else one all-gather ("setup")."""
    if known is not None:
        if len(known) != transport.world_size or known[transport.rank] != length:
            raise ValueError(f"rank {transport.rank} holds {length} rows but was told lengths {known}")
        return list(known)
    return [lens[0] for lens in transport.all_gather_ints("setup", [length])]


class DistTransport(Transport):
    """Transport over a torch.distributed process group (the default group when None)."""

    def __init__(self, group: dist.ProcessGroup | None = None, counter: CommCounter | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.counter = counter

    def _global(self, peer: int) -> int:
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def _post(self, sends, recvs):
        ops = [dist.P2POp(dist.isend, t, self._global(peer), self.group) for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, t, self._global(peer), self.group) for peer, t in recvs]
        return dist.batch_isend_irecv(ops) if ops else []

    def _wait(self, inner):
        for work in inner:
            work.wait()

    def _all_gather(self, tensor):
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor, group=self.group)
        return gathered

    def _all_reduce(self, tensor, op):
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return reduced


class _Fabric:
    """Shared state of N emulated ranks: one FIFO mailbox per ordered pair, and a collective slot."""

    def __init__(self, world_size: int, timeout_s: float):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.mailboxes = {(s, d): queue.Queue() for s in range(world_size) for d in range(world_size)}
        self.barrier = threading.Barrier(world_size, timeout=timeout_s)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def take(self, src: int, dst: int) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and not self.barrier.broken:
            try:
                # NOTE: a short blocking get, not a sleep: it returns as soon as the message lands and
                # lets this rank notice within 50 ms that another rank failed (barrier aborted).
                return self.mailboxes[(src, dst)].get(timeout=0.05)
            except queue.Empty:
                continue
        self.barrier.abort()
        raise TimeoutError(f"emulated rank {dst} gave up waiting for a message from rank {src}")


class EmulatedTransport(Transport):
    """One logical rank of N, running in a thread of this process. Build with `run_emulated`."""

    def __init__(self, fabric: _Fabric, rank: int, counter: CommCounter | None):
        self.fabric = fabric
        self.rank = rank
        self.world_size = fabric.world_size
        self.counter = counter

    def _post(self, sends, recvs):
        for peer, tensor in sends:
            # NOTE: clone, because the sender may overwrite its buffer right after the exchange
            # completes on its side, exactly as it may with a real isend once wait() returns.
            self.fabric.mailboxes[(self.rank, peer)].put(tensor.detach().clone())
        return recvs

    def _wait(self, recvs):
        for peer, buffer in recvs:
            buffer.copy_(self.fabric.take(peer, self.rank))

    def _all_gather(self, tensor):
        fabric = self.fabric
        fabric.slots[self.rank] = tensor.detach().clone()
        fabric.barrier.wait()
        gathered = [t.clone() for t in fabric.slots]
        fabric.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return gathered

    def _all_reduce(self, tensor, op):
        stacked = torch.stack(self._all_gather(tensor))
        return stacked.sum(dim=0) if op == "sum" else stacked.amax(dim=0)


def run_emulated(
    rank_fn: Callable[[Transport, Any], Any],
    shards: Sequence[Any],
    counters: Sequence[CommCounter] | None = None,
    timeout_s: float = 60.0,
) -> list[Any]:
    """Run rank_fn(transport, shard) for every shard as its own emulated rank; results in rank order.

    A rank that raises aborts the others' collectives; a rank left waiting for a message that never
    comes raises TimeoutError after timeout_s, so a broken schedule fails instead of hanging.
    """
    fabric = _Fabric(len(shards), timeout_s)
    transports = [
        EmulatedTransport(fabric, rank, counters[rank] if counters is not None else None)
        for rank in range(len(shards))
    ]
    with ThreadPoolExecutor(max_workers=len(shards)) as pool:
        futures = [pool.submit(_run_rank, rank_fn, t, shard) for t, shard in zip(transports, shards)]
        failures = [f.exception() for f in futures if f.exception() is not None]
    if failures:
        # the rank that failed first is the interesting one; the rest only saw the abort it caused
        causes = [e for e in failures if not isinstance(e, (threading.BrokenBarrierError, TimeoutError))]
        raise (causes or failures)[0]
    return [future.result() for future in futures]


def _run_rank(rank_fn: Callable[[Transport, Any], Any], transport: EmulatedTransport, shard: Any) -> Any:
    try:
        return rank_fn(transport, shard)
    except BaseException:
        transport.fabric.barrier.abort()
        raise
