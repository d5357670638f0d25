"""The executor contract: the engine's one door to the model and to the KV tensors.

The engine (engine.py) is the only caller. It owns every KV block (through the scheduler's BlockPool) and
tells the executor, step by step, what to compute and where each token's K/V goes. Two implementations:
the in-process `Worker` (services/engine/worker.py) and the Ray `ShardGroup` (services/shards/group.py),
which splits every sequence's KV over N actors. The CLI and the gateway build one
(`services.replica.build_engine`); the engine receives it and never imports Ray.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from longbow.services.engine.types import StepPlan, StepResult


@runtime_checkable
class Executor(Protocol):
    """Contract (every method is called from the engine thread only, one call at a time):

    - `execute(plan)`: first forget the requests in `plan.finished` (finished or aborted since the last
      step: their sampling state goes), then remember the sampling parameters of `plan.new_requests`
      (requests the executor has not seen; their `seed` is always set), then run ONE forward pass over
      `plan.chunks`: write each chunk's new K/V into `chunk.slots`, attend causally by position id over
      the chunk's KV (`block_table`/`kv_len`, or explicit `kv_slots`), and sample the next token of every
      chunk with `sample` set, except chunks with `want_logits` (document passes, jobs.py), whose last
      row's logits go back in `StepResult.logits`. Chunks whose ids were never in `new_requests` are
      document passes: no sampling state. Returns a `StepResult` of plain Python values (and those logits). A request whose own
      distribution cannot be sampled is reported in `StepResult.failed` (its batch-mates go on); a fault
      that loses KV (a dead shard) raises an `EngineError`, after which the engine fails the requests in
      flight and calls `recover()`.
    - KV slot operations for documents kept across edits (run between steps, by the engine's KV jobs): `shift_slots(slots, delta, rotate)` moves the
      tokens in `slots` by `delta` positions (re-rotating keys when `rotate`), `copy_slots(source, target)`
      copies K, V and positions slot by slot; `read_keys(layer, slots)` / `read_positions(slots)` read
      them back (tests, diagnostics).
    - `recover()`: after a fault, become usable again with empty KV (all cached KV is lost).
    - `stats()`: a JSON-able dict of counters (kernels, steps, bytes; per shard for the shard group).
    - `shutdown()`: release devices, processes and actors.
    """

    def execute(self, plan: StepPlan) -> StepResult: ...

    def shift_slots(self, slots: list[int], delta: int, rotate: bool) -> None: ...

    def copy_slots(self, source: list[int], target: list[int]) -> None: ...

    def read_keys(self, layer: int, slots: list[int]) -> dict[int, torch.Tensor]: ...

    def read_positions(self, slots: list[int]) -> dict[int, int]: ...

    def recover(self) -> None: ...

    def stats(self) -> dict: ...

    def shutdown(self) -> None: ...
