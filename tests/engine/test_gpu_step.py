"""The GPU step path (Triton step kernel + static-buffer decode step) equals the CPU path, end to end.

NOTE: without CUDA the kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is
imported, as in test_paged_attention.py) and the decode step runs eagerly from its static buffers instead of
replaying a captured CUDA graph: the same code minus the capture. A tiny random model in fp32 keeps the
interpreter fast; the reference is the per-request SDPA backend on the same weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from longbow.services.config import EngineConfig, LongbowConfig  # noqa: E402
from longbow.services.engine.engine import LLMEngine  # noqa: E402
from longbow.services.engine.model import ModelArgs, Transformer, fuse_projections  # noqa: E402
from longbow.services.engine.pie import DocumentKV, UpdateMode  # noqa: E402
from longbow.services.engine.types import SamplingParams  # noqa: E402
from longbow.services.engine.weights import LoadedModel  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ARGS = ModelArgs(vocab_size=211, dim=64, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16, intermediate_size=96,
                 norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=1024,
                 tie_embeddings=True, attention_bias=False, eos_token_ids=(0,))


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    torch.manual_seed(0)
    model = fuse_projections(Transformer(ARGS).to(DEVICE).eval())
    return LoadedModel(model, ARGS, Path("random"), DEVICE, torch.float32)


def _engine(tiny, attention: str, graphs: str, budget: int = 32) -> LLMEngine:
    config = LongbowConfig(engine=EngineConfig(token_budget=budget, block_size=8, num_blocks=64, max_seqs=8,
                                               attention=attention, decode_graphs=graphs))
    return LLMEngine(config, tiny)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, ARGS.vocab_size, (n,), generator=g).tolist() for n in (5, 23, 40)]


def test_kernel_and_decode_steps_equal_the_sdpa_engine(tiny):
    params = SamplingParams(max_tokens=6, min_tokens=6, temperature=0.8, top_k=20, seed=7)
    expected = _engine(tiny, "sdpa", "off").generate(_prompts(), params)
    engine = _engine(tiny, "triton", "eager")
    got = engine.generate(_prompts(), params)
    stats = engine.executor.stats()
    assert stats["attention"] == "StepPagedAttention" and stats["decode_graph_steps"] >= 4
    for g, e in zip(got, expected):
        assert g.token_ids == e.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-4, rtol=0)


def test_prompt_logprobs_through_the_kernel(tiny):
    ids = _prompts()[2]
    expected = _engine(tiny, "sdpa", "off").score(ids)
    got = _engine(tiny, "triton", "off", budget=16).score(ids)  # chunked: later chunks see earlier KV
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=0)


def test_pie_edited_document_predicts_the_same(tiny):
    """Keys out of position order after an edit: causality by position id through the kernel."""
    outputs = []
    for attention in ("sdpa", "triton"):
        engine = _engine(tiny, attention, "off")
        document = DocumentKV.for_engine(engine, chunk_tokens=16)
        document.encode(_prompts()[2])
        document.replace(5, 9, [3, 4, 5, 6, 7, 8, 9], UpdateMode.PIE)  # later keys shift by +3
        outputs.append(document.predict(20, [], max_tokens=4, stop_ids=set()))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4


def test_a_failing_kernel_or_graph_costs_speed_not_requests(tiny, monkeypatch):
    from longbow.services.engine import gpu_step

    params = SamplingParams(max_tokens=5, min_tokens=5)
    expected = _engine(tiny, "sdpa", "off").generate(_prompts(), params)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel refused to compile")

    monkeypatch.setattr(gpu_step.kernels, "paged_attention", broken)
    engine = _engine(tiny, "triton", "eager")
    got = engine.generate(_prompts(), params)
    stats = engine.executor.stats()
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert stats["kernel_fallbacks"] == 1 and stats["attention"] == "LocalPagedAttention"
    assert engine.executor.graphs is None  # the graph step failed too (same kernel): eager from then on
