"""DeepSpeed-Ulysses: all-to-all from sequence shards to head shards, local attention, and back.

Each rank starts with all heads of its tokens and, after one all-to-all per tensor, holds Hq/N query
heads and Hkv/N KV heads of every token; it attends locally and a last all-to-all returns the output
to the token's owner. Needs Hkv % N == 0 (GQA groups must not be torn across ranks).

Over torch.distributed this is deepspeed.sequence.layer.DistributedAttention; the emulated form runs
the same exchanges through the Transport. Uneven shards are padded to the longest (all-to-all needs
equal chunks); padded rows are dropped before attention, so no sentinel reaches the math. The output
all-to-all carries out and lse together as [.., D + 1] fp32 columns, so lse comes back exactly.
Packed batches (sequence ids, see tokenring): the position all-gather carries the token keys.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from longbow.ringattn.comm import CommCounter, DistTransport, Transport, run_emulated, setup_lengths
from longbow.ringattn.layout import Shard, check_packed
from longbow.ringattn.local import keyed_attention, token_keys


def ulysses_supported(heads_kv: int, world_size: int) -> bool:
    return heads_kv % world_size == 0


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    group: dist.ProcessGroup | None = None,
    counter: CommCounter | None = None,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
    q_lens: list[int] | None = None,
    kv_lens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's queries attended over every rank's KV. Returns out [Tq, Hq, D], lse [Tq, Hq] fp32.
    q_seq/k_seq: a packed batch (see tokenring); q_lens/kv_lens: every rank's counts, when known."""
    transport = DistTransport(group, counter)
    return ulysses_rank(transport, q, k, v, q_pos, k_pos, causal=causal, exchange=_DeepSpeedExchange(group),
                        q_seq=q_seq, k_seq=k_seq, q_lens=q_lens, kv_lens=kv_lens)


def ulysses_attention_emulated(
    shards: list[Shard], *, causal: bool = True, counters: list[CommCounter] | None = None,
    q_lens: list[int] | None = None, kv_lens: list[int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same schedule over N emulated ranks in this process (one shard per rank)."""
    return run_emulated(
        lambda transport, s: ulysses_rank(transport, s.q, s.k, s.v, s.q_pos, s.k_pos, causal=causal,
                                          q_seq=s.q_seq, k_seq=s.k_seq, q_lens=q_lens, kv_lens=kv_lens),
        shards,
        counters,
    )


def _pad_rows(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[0] == length:
        return x.contiguous()
    return torch.cat([x, x.new_zeros(length - x.shape[0], *x.shape[1:])])


def _valid_rows(lengths: list[int], padded: int) -> torch.Tensor:
    """Indices of real rows in a rank-major concatenation of blocks padded to `padded` rows."""
    return torch.cat([torch.arange(r * padded, r * padded + n) for r, n in enumerate(lengths)])


class _LocalAttention(torch.nn.Module):
    """What runs between the all-to-alls: attention over every token for this rank's heads.

    Inputs are [1, N*T_pad, H/N, D]; returns [1, N*Tq_pad, Hq/N, D+1] fp32 with lse in the last column.
    """

    def __init__(self) -> None:
        super().__init__()
        self.compute_s = 0.0

    def forward(self, q, k, v, *, q_rows, k_rows, q_pos, k_pos, causal, packed=False):
        start = time.perf_counter()
        if q_pos is None:  # no mask: positions are never read
            q_pos = torch.zeros(len(q_rows), dtype=torch.int64)
            k_pos = torch.zeros(len(k_rows), dtype=torch.int64)
        out, lse = keyed_attention(
            q[0, q_rows], k[0, k_rows], v[0, k_rows], q_pos, k_pos, causal=causal, packed=packed
        )  # [Tq_all, Hq/N, D], [Tq_all, Hq/N]
        packed = torch.zeros(q.shape[1], q.shape[2], q.shape[3] + 1, dtype=torch.float32, device=q.device)
        packed[q_rows] = torch.cat([out, lse.unsqueeze(-1)], dim=-1)
        self.compute_s += time.perf_counter() - start
        return packed.unsqueeze(0)


def _skip_shm_comm_build() -> None:
    # NOTE: on CPU, deepspeed.comm JIT-compiles a shared-memory allreduce extension on first init. Every
    # rank builds it at once under one file lock in ~/.cache/torch_extensions: minutes on 2 cores, and a
    # process killed mid-build leaves the lock behind so later inits wait forever (seen in CI: gloo
    # timeouts on the ranks that were not building). Ulysses only uses all-to-all, which does not need
    # it, so we mark the op unavailable and deepspeed falls back to plain torch.distributed.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class _DeepSpeedExchange:
    """Runs the four all-to-alls through deepspeed's DistributedAttention."""

    def __init__(self, group: dist.ProcessGroup | None):
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention

        if not deepspeed.comm.is_initialized():
            _skip_shm_comm_build()
            deepspeed.comm.init_distributed(dist_backend=dist.get_backend(group), verbose=False)
        self.local = _LocalAttention()
        group = group if group is not None else dist.group.WORLD
        self.attention = DistributedAttention(self.local, group, scatter_idx=2, gather_idx=1)

    def __call__(self, q, k, v, **local_args) -> torch.Tensor:
        return self.attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0, **local_args)[0]


class _TransportExchange:
    """The same four all-to-alls over a Transport (emulated ranks)."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.local = _LocalAttention()

    def _seq_to_heads(self, step: str, x: torch.Tensor) -> torch.Tensor:
        """[T_pad, H, D] sequence shard -> [N*T_pad, H/N, D] head shard (rank-major sequence)."""
        n = self.transport.world_size
        return torch.cat(self.transport.all_to_all(step, list(x.chunk(n, dim=1))))

    def _heads_to_seq(self, step: str, x: torch.Tensor) -> torch.Tensor:
        """[N*T_pad, H/N, C] head shard -> [T_pad, H, C] sequence shard."""
        n = self.transport.world_size
        return torch.cat(self.transport.all_to_all(step, list(x.chunk(n, dim=0))), dim=1)

    def __call__(self, q, k, v, **local_args) -> torch.Tensor:
        heads = [self._seq_to_heads(name, x) for name, x in (("q", q), ("k", k), ("v", v))]
        packed = self.local(*(x.unsqueeze(0) for x in heads), **local_args)[0]
        return self._heads_to_seq("out", packed)


def _record_deepspeed_bytes(transport: Transport, shapes: dict[str, torch.Tensor]) -> None:
    """Count DistributedAttention's all-to-alls: each rank keeps 1/N of every tensor, sends the rest."""
    if transport.counter is None:
        return
    n = transport.world_size
    for step, tensor in shapes.items():
        nbytes = (n - 1) * tensor.numel() * tensor.element_size() // n
        transport.counter.record(step, "all_to_all", -1, nbytes, nbytes)


def ulysses_rank(
    transport: Transport,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    exchange=None,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
    q_lens: list[int] | None = None,
    kv_lens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses for one rank. `exchange` defaults to all-to-alls over the transport."""
    n = transport.world_size
    t_q, h_q, d = q.shape
    if not ulysses_supported(k.shape[1], n):
        raise ValueError(f"Ulysses needs KV heads ({k.shape[1]}) divisible by the number of ranks ({n})")
    packed = check_packed(q_seq, k_seq)
    q_pos, k_pos = token_keys(q_pos, q_seq), token_keys(k_pos, k_seq)
    if (q_lens is None) != (kv_lens is None):
        raise ValueError("pass both q_lens and kv_lens, or neither")
    if q_lens is None:
        lengths = transport.all_gather_ints("setup", [t_q, k.shape[0]])
        q_lens, k_lens = [x[0] for x in lengths], [x[1] for x in lengths]
    else:
        q_lens, k_lens = setup_lengths(transport, t_q, q_lens), setup_lengths(transport, k.shape[0], kv_lens)
    q_pad, k_pad = max(q_lens), max(k_lens)
    q_rows, k_rows = _valid_rows(q_lens, q_pad), _valid_rows(k_lens, k_pad)
    all_q_pos = all_k_pos = None
    if causal or packed:  # token keys: positions, and sequence ids when packed
        gathered = transport.all_gather("positions", torch.cat([_pad_rows(q_pos, q_pad), _pad_rows(k_pos, k_pad)]))
        all_q_pos = torch.cat([g[:q_pad] for g in gathered])[q_rows]
        all_k_pos = torch.cat([g[q_pad:] for g in gathered])[k_rows]
    exchange = exchange if exchange is not None else _TransportExchange(transport)
    padded = {"q": _pad_rows(q, q_pad), "k": _pad_rows(k, k_pad), "v": _pad_rows(v, k_pad)}
    packed = exchange(
        padded["q"], padded["k"], padded["v"],
        q_rows=q_rows, k_rows=k_rows, q_pos=all_q_pos, k_pos=all_k_pos, causal=causal, packed=packed,
    )  # [T_pad, Hq, D + 1]
    if isinstance(exchange, _DeepSpeedExchange):
        _record_deepspeed_bytes(transport, {**padded, "out": packed})
    return packed[:t_q, :, :d].contiguous(), packed[:t_q, :, d].contiguous()
