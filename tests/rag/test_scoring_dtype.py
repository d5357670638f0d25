"""The scoring dtype (`rag.scoring_dtype`): how it resolves, and what bfloat16 scoring does to Meta-Chunking
on the real model, against float32 scoring of the same windows."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from longbow.rag.chunking import perplexity_boundaries, sentence_spans
from longbow.rag.chunking.perplexity import WINDOW, scored_logprobs, sentence_means
from longbow.services.config import EngineConfig, LongbowConfig, ModelSource, RagConfig, load_config
from longbow.services.text import lm as lm_module
from longbow.services.text.lm import EngineLM, native_bfloat16, scoring_config, scoring_dtype


def _config(choice: str, model_dtype: str = "float32") -> LongbowConfig:
    return LongbowConfig(model=ModelSource(device="cpu", dtype=model_dtype), rag=RagConfig(scoring_dtype=choice))


@pytest.mark.parametrize("choice, model_dtype, expected", [
    ("float32", "bfloat16", "float32"),
    ("bfloat16", "float32", "bfloat16"),
    ("model", "float32", "float32"),
    ("model", "auto", "auto"),  # the engine resolves it (float32 on CPU, bfloat16 on CUDA)
])
def test_explicit_scoring_dtypes_need_no_hardware_check(choice, model_dtype, expected, monkeypatch):
    monkeypatch.setattr(lm_module, "native_bfloat16", lambda device: pytest.fail("checked the hardware"))
    assert scoring_dtype(_config(choice, model_dtype)) == expected


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_is_bfloat16_only_where_the_device_has_it(native, expected, monkeypatch):
    seen = []
    monkeypatch.setattr(lm_module, "native_bfloat16", lambda device: seen.append(device) or native)
    assert scoring_dtype(_config("auto")) == expected
    assert seen == [torch.device("cpu")]


def test_unknown_scoring_dtype_is_an_error():
    with pytest.raises(ValueError, match="rag.scoring_dtype"):
        scoring_dtype(_config("float16"))


def test_scoring_config_changes_only_the_model_dtype_of_a_copy():
    config = _config("bfloat16")
    scoring = scoring_config(config)
    assert scoring.model.dtype == "bfloat16" and config.model.dtype == "float32"
    assert dataclasses.replace(scoring.model, dtype="float32") == config.model and scoring.engine == config.engine


def test_scoring_dtype_reads_its_environment_variable(monkeypatch):
    monkeypatch.setenv("LONGBOW_RAG_SCORING_DTYPE", "float32")
    assert load_config().rag.scoring_dtype == "float32"
    monkeypatch.delenv("LONGBOW_RAG_SCORING_DTYPE")
    assert load_config().rag.scoring_dtype == "auto"


def test_native_bfloat16_on_this_cpu_matches_its_instruction_set_flags():
    """torch's checks against the kernel's own account of the CPU (Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    assert native_bfloat16(torch.device("cpu")) == bool({"avx512_bf16", "amx_tile"} & flags)


@pytest.mark.slow
def test_bfloat16_scoring_keeps_sentence_nll_and_boundaries_of_float32(engine_lm):
    """The same ~1,100-token real text (collections + argparse docstrings: three windows) scored by the
    float32 engine and by `EngineLM.for_scoring` in bfloat16. Measured (CPU, 2 cores): per-sentence mean
    NLL differs by 0.012 nats on average, 0.05 at most, over 80 sentences; 29 of 29 boundaries shared
    (on 4,096 tokens: 0.012 / 0.067 over 311 sentences, 99 of 100). Asserted with margin: max <= 0.1,
    mean <= 0.03, >= 90% of boundaries shared; and that bf16 did run (the numbers are not identical)."""
    from longbow.rag.eval.stdlib import module_text

    config = LongbowConfig(model=ModelSource(device="cpu", dtype="float32"),
                           engine=EngineConfig(token_budget=512, block_size=16, num_blocks=256),
                           rag=RagConfig(scoring_dtype="bfloat16"))
    scorer = EngineLM.for_scoring(config)
    assert scorer.engine.loaded.dtype == torch.bfloat16
    text = module_text("collections") + " " + module_text("argparse")
    ids, offsets = engine_lm.tokenize_with_offsets(text)
    ids, offsets = ids[:1100], offsets[:1100]
    assert 2 * WINDOW < len(ids)
    text = text[:offsets[-1][1]]
    reference, candidate = scored_logprobs(engine_lm, ids), scored_logprobs(scorer, ids)
    assert len(candidate) == len(reference) == len(ids) - 1
    assert sum(abs(a - b) for a, b in zip(reference, candidate)) / len(reference) > 1e-4
    sentences = sentence_spans(text)
    old, new = sentence_means(reference, offsets, sentences), sentence_means(candidate, offsets, sentences)
    differences = [abs(a - b) for a, b in zip(old, new) if not math.isnan(a)]
    assert len(differences) > 50
    assert max(differences) <= 0.1 and sum(differences) / len(differences) <= 0.03, differences
    cuts_old, cuts_new = set(perplexity_boundaries(old, 0.0)), set(perplexity_boundaries(new, 0.0))
    assert len(cuts_old) > 10
    assert len(cuts_old & cuts_new) >= 0.9 * max(len(cuts_old), len(cuts_new)), (cuts_old, cuts_new)


@pytest.mark.parametrize("chunker, scores", [("perplexity", True), ("margin", True), ("sentence", False)])
def test_cli_ingest_builds_its_scorer_in_the_scoring_dtype(chunker, scores, tmp_path, monkeypatch):
    """`longbow ingest` gets its LM from EngineLM.for_scoring (stopped there: no model is loaded)."""
    from longbow.services import cli

    built = []

    def for_scoring(config=None):
        built.append(config)
        raise ValueError("stop before loading the model")

    monkeypatch.setenv("LONGBOW_RAG_DIR", str(tmp_path / "store"))
    monkeypatch.setattr(EngineLM, "for_scoring", staticmethod(for_scoring))
    monkeypatch.setattr(EngineLM, "from_config", staticmethod(lambda config=None: pytest.fail("serving dtype")))
    (tmp_path / "doc.txt").write_text("One sentence. Another sentence.")
    code = cli.main(["ingest", str(tmp_path / "doc.txt"), "--chunker", chunker])
    assert len(built) == int(scores) and code == (2 if scores else 0)
