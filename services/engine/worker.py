"""A worker executes StepPlans: it owns the model, the KV tensors and the per-request generators.

scheduler -> worker: `StepPlan` (token ids, positions, KV slots, block tables); worker -> scheduler:
`StepResult` (sampled ids, logprobs) as plain Python values. Nothing here decides what runs.
"""

from __future__ import annotations

import torch

from services.engine.kv_cache import LocalPagedAttention, LocalStepMeta, PagedKVCache, Segment
from services.engine.sampler import entropy_and_logprobs, new_generator, sample_row
from services.engine.types import SampledToken, SamplingParams, StepPlan, StepResult
from services.engine.weights import LoadedModel


class Worker:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int):
        self.model, self.args, self.device = loaded.model, loaded.args, loaded.device
        self.cache = PagedKVCache(loaded.args, num_blocks, block_size, loaded.device, loaded.dtype)
        self.backend = LocalPagedAttention(self.cache, loaded.args.n_layers)
        self.params: dict[str, SamplingParams] = {}
        self.generators: dict[str, torch.Generator] = {}

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        self.params[request_id] = params
        self.generators[request_id] = new_generator(params.seed, self.device)

    def release(self, request_id: str) -> None:
        self.params.pop(request_id, None)
        self.generators.pop(request_id, None)

    def execute(self, plan: StepPlan) -> StepResult:
        meta, tokens, logit_rows, row_of = self._build_inputs(plan)
        self.backend.prepare(meta)
        logits = self.model(tokens, meta.positions, self.backend, meta, logit_rows)  # [R, V]
        entropy, logprobs = entropy_and_logprobs(logits)
        result = StepResult()
        for chunk in plan.chunks:
            rows = row_of[chunk.request_id]
            params = self.params[chunk.request_id]
            if params.prompt_logprobs:
                # Row i predicts token i+1; the chunk's last row predicts the next chunk's first token.
                targets = chunk.token_ids[1:] + ([chunk.next_token_id] if chunk.next_token_id is not None else [])
                picked = logprobs[rows][: len(targets)].gather(1, _ids(targets, logits.device).unsqueeze(1))
                result.prompt_logprobs[chunk.request_id] = picked.squeeze(1).tolist()
            if chunk.sample:
                last = rows.stop - 1
                result.sampled[chunk.request_id] = self._sample(chunk, last, logits, logprobs, entropy, meta)
        return result

    def _sample(self, chunk, row, logits, logprobs, entropy, meta) -> SampledToken:
        params = self.params[chunk.request_id]
        banned = ()
        if chunk.num_generated < params.min_tokens:
            banned = tuple(set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.args.eos_token_ids)))
        token = sample_row(logits[row], params, self.generators[chunk.request_id], banned)
        attention = meta.attention_rows.get(chunk.request_id)
        return SampledToken(
            token_id=token,
            logprob=float(logprobs[row, token]),
            entropy=float(entropy[row]),
            attention=_by_position(attention, self.cache, chunk) if attention is not None else None,
        )

    def _build_inputs(self, plan: StepPlan):
        tokens, positions, slots, segments = [], [], [], []
        logit_rows: list[int] = []
        row_of: dict[str, slice] = {}
        for chunk in plan.chunks:
            start = len(tokens)
            tokens += chunk.token_ids
            positions += chunk.positions
            slots += chunk.slots
            rows = slice(start, len(tokens))
            params = self.params[chunk.request_id]
            kv_slots = self.cache.slots_of(chunk.block_table, chunk.kv_len)
            segments.append(Segment(chunk.request_id, rows, kv_slots, params.return_attention and chunk.sample))
            # Project to the vocabulary only the rows someone will read: every row of a scoring
            # request, otherwise just the last row of a chunk that samples.
            wanted = range(start, len(tokens)) if params.prompt_logprobs else ([len(tokens) - 1] if chunk.sample else [])
            row_of[chunk.request_id] = slice(len(logit_rows), len(logit_rows) + len(wanted))
            logit_rows += wanted
        meta = LocalStepMeta(_ids(slots, self.device), _ids(positions, self.device), segments, {})
        return meta, _ids(tokens, self.device), _ids(logit_rows, self.device), row_of


def _ids(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _by_position(probs: torch.Tensor, cache: PagedKVCache, chunk) -> list[float]:
    """Attention probabilities re-indexed by position id (storage order is not position order)."""
    positions = cache.positions[cache.slots_of(chunk.block_table, chunk.kv_len)]
    dense = torch.zeros(int(positions.max()) + 1, dtype=torch.float32, device=probs.device)
    dense[positions] = probs
    return dense.tolist()
