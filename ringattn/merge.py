"""Exact merge of partial attention results.

Two partial results over disjoint key sets, each an output `out` and its log-sum-exp `lse`, combine
into the attention over the union of keys. The form below (from the ring-attention literature) never
exponentiates an lse, so lse values of +-80 or more stay finite in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_partials(
    out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (out_b, lse_b) into (out, lse). out: [T, H, D] fp32, lse: [T, H] fp32.

    A row with lse = -inf saw no keys and contributes nothing; if both are -inf the row stays empty.
    """
    out, lse = out.float(), lse.float()
    out_b, lse_b = out_b.float(), lse_b.float()
    a_empty = torch.isneginf(lse)
    b_empty = torch.isneginf(lse_b)
    # NOTE: replace -inf by 0 before the arithmetic so no inf - inf = nan leaks into rows that
    # torch.where discards anyway (NaNs would poison autograd and debugging output).
    safe_lse = torch.where(a_empty, torch.zeros_like(lse), lse)
    safe_lse_b = torch.where(b_empty, torch.zeros_like(lse_b), lse_b)
    weight_b = torch.sigmoid(safe_lse_b - safe_lse).unsqueeze(-1)  # [T, H, 1]
    merged_out = out - weight_b * (out - out_b)
    merged_lse = safe_lse - F.logsigmoid(safe_lse - safe_lse_b)
    merged_out = torch.where(b_empty.unsqueeze(-1), out, merged_out)
    merged_out = torch.where(a_empty.unsqueeze(-1), out_b, merged_out)
    merged_lse = torch.where(b_empty, lse, merged_lse)
    merged_lse = torch.where(a_empty, lse_b, merged_lse)
    return merged_out, merged_lse


def merge_many(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a list of (out, lse) partials into one, left to right."""
    out, lse = parts[0]
    for out_b, lse_b in parts[1:]:
        out, lse = merge_partials(out, lse, out_b, lse_b)
    return out, lse
