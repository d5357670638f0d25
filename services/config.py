"""Configuration: one dataclass per component, composed into `LongbowConfig`.

This is the only module that reads environment variables (LONGBOW_*). A TOML file can supply the same
keys (`[engine] token_budget = 512`); precedence: explicit arguments > environment > file > defaults.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUNDLED_MODEL = "smollm2-135m-instruct"


def longbow_home() -> Path:
    """Cache directory for converted weights and other derived files."""
    return Path(os.environ.get("LONGBOW_HOME", Path.home() / ".cache" / "longbow")).expanduser()


@dataclass
class ModelSource:
    """Which weights to serve: the bundled model's name or a local Hugging Face checkpoint directory."""

    name_or_path: str = BUNDLED_MODEL
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available
    # auto: float32 linear layers on CPU run oneDNN's kernel on weights it holds (model.PackedLinear:
    # 1.5-3x faster with few rows per step), everything else torch's own; "torch": torch's everywhere.
    linear_kernel: str = "auto"


@dataclass
class EngineConfig:
    """One model replica. token_budget is SplitFuse's fixed tokens per forward pass."""

    token_budget: int = 0  # 0: by device, 512 on CPU and 2048 on a GPU (engine.default_token_budget)
    # Tokens of document passes (edit sessions, engine/jobs.py) added at most to a step that also serves
    # requests; a step with no request gives documents the whole token_budget. 0: token_budget // 16.
    document_tokens: int = 0
    # ... paced by measured step time (engine/jobs.py DocumentPacer): a step that carries documents beside
    # requests takes at most this many times what the requests' step takes alone. 0: no pacing, always
    # document_tokens.
    document_step_ratio: float = 1.5
    block_size: int = 16
    num_blocks: int = 2048  # KV capacity = num_blocks * block_size tokens
    max_seqs: int = 64  # sequences per step
    attention: str = "auto"  # auto: the Triton step kernel on CUDA, per-request SDPA on CPU; sdpa | triton
    decode_graphs: str = "auto"  # auto: decode steps replay CUDA graphs on CUDA; on | eager | off
    max_queue: int = 1024  # waiting requests before CapacityError
    policy: str = "splitfuse"  # or "prefill_first"
    max_model_len: int | None = None  # None: the model's own context length
    shards: int = 0  # 0: in-process worker; N >= 1: N Ray actors splitting every sequence
    ray_address: str = ""  # empty: start a local Ray; else join that cluster ("auto", "ray://...")
    cpus_per_shard: float = 1.0
    placement_timeout_s: float = 120.0  # waiting for Ray to place the shards before giving up
    step_timeout_s: float = 120.0  # a step slower than this fails (a shard is presumed lost)
    collective_timeout_s: float = 60.0  # gloo/NCCL timeout: a lost peer fails, never hangs
    # Where Ray puts the shards (services/shards/placement.py): PACK (fewest nodes), SPREAD, STRICT_PACK
    # (one node), STRICT_SPREAD (one shard per node).
    placement_strategy: str = "PACK"
    gpus_per_shard: float | None = None  # None: 1 on CUDA (model.device cuda, or auto on a cluster with GPUs)


@dataclass
class GatewayConfig:
    """The gRPC front door. auth_token empty: no auth; tls_cert/tls_key set: TLS on the gRPC port."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port (tests)
    metrics_port: int | None = 9464  # Prometheus text format over HTTP; None: off
    auth_token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    max_inflight: int = 64  # concurrent generation calls before RESOURCE_EXHAUSTED
    default_max_tokens: int = 128
    max_prompt_chars: int = 1_000_000
    max_receive_bytes: int = 0  # 0: sized to the largest valid prompt or document (gateway/limits.py), ~5 MB
    # Pods (k8s/, services/gateway/lifecycle.py): drain, readiness, replica-local sessions.
    health_port: int | None = None  # plaintext gRPC health only, for kubelet probes (no TLS, no token); None: off
    shutdown_timeout_s: float = 30.0  # after SIGTERM, in-flight streams get this long before UNAVAILABLE
    stall_timeout_s: float = 60.0  # queued work with no engine step for this long: NOT_SERVING
    replica_id: str = ""  # names this replica in session ids (the pod name); empty: the host name


@dataclass
class RagConfig:
    """The retrieval front end (rag/). store_url empty: the embedded store under data_dir."""

    store_url: str = ""  # "redis://host:6379/0" in deployments
    require_durable: bool = True  # refuse a Redis without AOF (acknowledged documents lost in a crash)
    data_dir: str = ""  # embedded store directory; empty: LONGBOW_HOME/rag
    default_chunker: str = "perplexity"  # fixed | sentence | perplexity | margin
    target_chunk_tokens: int = 128  # chunk length (model tokens) when a request leaves it 0
    perplexity_theta: float = 0.0  # Meta-Chunking: a neighbour must be this much higher (nats) to cut
    # The dtype an embedded scorer (`longbow ingest`, bench/rag.py) builds its engine in, for the perplexity
    # and margin chunkers: auto (bfloat16 where the device multiplies bf16 in hardware: CUDA, a CPU with
    # AVX512-BF16 or AMX; else the model's dtype) | model (model.dtype) | float32 | bfloat16. The gateway
    # scores on its serving engine, in model.dtype: one engine, one copy of the weights, one scheduler.
    scoring_dtype: str = "auto"
    dense_index: str = "flat"  # flat (exact) | hnsw | ivf (large corpora)
    candidates: int = 50  # per retriever, before reciprocal rank fusion
    max_documents_per_request: int = 1000
    max_document_chars: int = 1_000_000
    max_top_k: int = 100
    follow_interval_s: float = 0.5  # how often a gateway applies the store's change log without a query


@dataclass
class CodeContextConfig:
    """Typed-hole code context (rag/codectx/). allowed_roots empty (the default): the server reads no file
    from disk, a workspace is what the client sends (UpdateFiles, open files); set it (LONGBOW_CODE_ROOTS)
    to let requests whose root lies inside one of these directories read it from disk."""

    default_token_budget: int = 2048
    max_token_budget: int = 16384
    allowed_roots: list[str] = field(default_factory=list)
    max_file_bytes: int = 1_000_000  # larger files are refused (open files) or skipped (the index)
    max_files: int = 5_000  # files indexed per workspace
    max_open_files: int = 200  # open files one request may send
    max_workspaces: int = 8  # workspace indexes kept; the least recently used is dropped
    default_max_tokens: int = 64  # fill length when the request leaves max_tokens at 0
    max_read_files: int = 2_000  # files one request may read from disk (the index catches up later)
    max_read_bytes: int = 32_000_000  # bytes one request may read from disk
    max_request_s: float = 10.0  # time one request may spend reading and indexing the disk


@dataclass
class SessionsConfig:
    """PIE edit sessions: each keeps one document's KV in the engine between calls."""

    idle_timeout_s: float = 600.0  # an untouched session is closed and its KV freed
    max_idle_timeout_s: float = 3600.0  # the most a client may ask for (issue 16: 4294967295 held KV forever)
    max_sessions_per_client: int = 8
    max_sessions: int = 64
    max_document_tokens: int = 16384  # tokens per session
    drift_budget_tokens: int = 512  # tokens changed since the last full encode before a re-encode
    max_kv_fraction: float = 0.5  # of the KV cache, held by all sessions together; requests keep the rest
    evict_idle_after_s: float = 30.0  # untouched this long: evicted (least recently used) when KV is needed


@dataclass
class LongbowConfig:
    model: ModelSource = field(default_factory=ModelSource)
    engine: EngineConfig = field(default_factory=EngineConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    code: CodeContextConfig = field(default_factory=CodeContextConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)


_ENV_KEYS = {
    "LONGBOW_MODEL": ("model", "name_or_path", str),
    "LONGBOW_DTYPE": ("model", "dtype", str),
    "LONGBOW_DEVICE": ("model", "device", str),
    "LONGBOW_TOKEN_BUDGET": ("engine", "token_budget", int),
    "LONGBOW_BLOCK_SIZE": ("engine", "block_size", int),
    "LONGBOW_NUM_BLOCKS": ("engine", "num_blocks", int),
    "LONGBOW_MAX_SEQS": ("engine", "max_seqs", int),
    "LONGBOW_POLICY": ("engine", "policy", str),
    "LONGBOW_ATTENTION": ("engine", "attention", str),
    "LONGBOW_DECODE_GRAPHS": ("engine", "decode_graphs", str),
    "LONGBOW_SHARDS": ("engine", "shards", int),
    "LONGBOW_RAY_ADDRESS": ("engine", "ray_address", str),
    "LONGBOW_PLACEMENT_STRATEGY": ("engine", "placement_strategy", str),
    "LONGBOW_GPUS_PER_SHARD": ("engine", "gpus_per_shard", float),
    "LONGBOW_HOST": ("gateway", "host", str),
    "LONGBOW_PORT": ("gateway", "port", int),
    "LONGBOW_METRICS_PORT": ("gateway", "metrics_port", int),
    "LONGBOW_AUTH_TOKEN": ("gateway", "auth_token", str),
    "LONGBOW_TLS_CERT": ("gateway", "tls_cert", str),
    "LONGBOW_TLS_KEY": ("gateway", "tls_key", str),
    "LONGBOW_MAX_INFLIGHT": ("gateway", "max_inflight", int),
    "LONGBOW_HEALTH_PORT": ("gateway", "health_port", int),
    "LONGBOW_SHUTDOWN_TIMEOUT_S": ("gateway", "shutdown_timeout_s", float),
    "LONGBOW_REPLICA_ID": ("gateway", "replica_id", str),
    "LONGBOW_STORE_URL": ("rag", "store_url", str),
    "LONGBOW_STORE_REQUIRE_DURABLE": ("rag", "require_durable", lambda value: value.strip().lower() not in
                                      ("0", "false", "no", "off")),
    "LONGBOW_RAG_DIR": ("rag", "data_dir", str),
    "LONGBOW_RAG_CHUNKER": ("rag", "default_chunker", str),
    "LONGBOW_RAG_TARGET_TOKENS": ("rag", "target_chunk_tokens", int),
    "LONGBOW_RAG_DENSE_INDEX": ("rag", "dense_index", str),
    "LONGBOW_RAG_SCORING_DTYPE": ("rag", "scoring_dtype", str),
    "LONGBOW_SESSION_IDLE_S": ("sessions", "idle_timeout_s", float),
    "LONGBOW_CODE_ROOTS": ("code", "allowed_roots", lambda value: [p for p in value.split(os.pathsep) if p]),
}


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> LongbowConfig:
    """Build the config from defaults, an optional TOML file, the environment, then `overrides`
    given as `section__key=value` (e.g. engine__token_budget=256)."""
    config = LongbowConfig()
    path = path or os.environ.get("LONGBOW_CONFIG")
    if path:
        with open(path, "rb") as f:
            for section, values in tomllib.load(f).items():
                for key, value in values.items():
                    _set(config, section, key, value)
    for env, (section, key, cast) in _ENV_KEYS.items():
        if env in os.environ:
            _set(config, section, key, cast(os.environ[env]))
    for name, value in overrides.items():
        section, key = name.split("__", 1)
        _set(config, section, key, value)
    return config


def _set(config: LongbowConfig, section: str, key: str, value: Any) -> None:
    part = getattr(config, section, None)
    if part is None or key not in {f.name for f in dataclasses.fields(part)}:
        raise ValueError(f"unknown config key {section}.{key}")
    setattr(part, key, value)
