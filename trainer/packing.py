"""Packed sequences: no compute on padding (docs/design.md section 6b).

    plan_micro_batches(lengths, active, world_size, rank, max_tokens) -> [[traj indices] | None, ...]
    pack(trajs, advantages, device) -> PackedBatch (one row of concatenated sequences)
    PACKED_ATTENTION                   # the attention implementation name a packed model uses

A micro-batch is one row holding several trajectories (prompt + response) back to back, with
position ids restarting at 0 for each, as the engine saw them. Attention stays within each
sequence: on a GPU through FlashAttention's variable-length kernel (`torch.nn.attention.varlen`,
bf16/fp16), elsewhere through one causal `scaled_dot_product_attention` per sequence; neither
computes anything on padding or across sequences. Only the positions that predict a response
token go through the LM head (trainer/logprobs.py).

Micro-batches are formed by a token budget (`trainer.max_tokens_per_micro_batch`, as verl's
`ppo_max_token_len_per_gpu` and AReaL's `max_tokens_per_mb`) and balanced across the FSDP ranks:
trajectories, longest first, go to the rank with the fewest tokens so far, then each rank packs
its share first-fit decreasing. Every rank gets the same number of micro-batches (FSDP gathers in
each), a rank with fewer getting `None` entries to run as a stand-in at weight 0.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rollout.trajectory import Trajectory

PACKED_ATTENTION = "tether_packed"


def plan_micro_batches(lengths: list[int], active: list[int], world_size: int, rank: int,
                       max_tokens: int) -> list[list[int] | None]:
    """This rank's micro-batches (lists of trajectory indices, each in ascending order) of the `active`
    trajectories, `lengths[i]` tokens each; padded with None to the largest count over the ranks.
    A trajectory longer than `max_tokens` gets a micro-batch of its own."""
    order = sorted(active, key=lambda i: (-lengths[i], i))
    totals = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:  # longest first, to the lightest rank: balanced tokens per rank
        r = min(range(world_size), key=lambda k: (totals[k], k))
        shares[r].append(i)
        totals[r] += lengths[i]
    packed = [_first_fit(share, lengths, max_tokens) for share in shares]
    n = max(len(p) for p in packed)
    mine: list[list[int] | None] = [sorted(mb) for mb in packed[rank]]
    return mine + [None] * (n - len(mine))


def _first_fit(indices: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing bin packing (`indices` are already longest first)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in indices:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


@dataclass
class PackedBatch:
    """One micro-batch as one row. T = tokens in the row, R = response tokens (the trained positions)."""

    ids: torch.Tensor  # (1, T) prompt + response of every trajectory, back to back
    positions: torch.Tensor  # (1, T) 0.. per sequence
    cu_seqlens: torch.Tensor  # (n + 1,) int32 sequence boundaries in the row
    bounds: list[int]  # the same boundaries as Python ints
    max_len: int  # longest sequence
    predict_at: torch.Tensor  # (R,) row position whose output predicts each response token
    targets: torch.Tensor  # (R,) the response tokens
    behav: torch.Tensor  # (1, R) behaviour log-probs
    mask: torch.Tensor  # (1, R) loss mask: 1 on model-written tokens
    advantages: torch.Tensor  # (1, R) each token's advantage (its sequence's, or its own with GAE)
    seq_index: torch.Tensor  # (1, R) which sequence of the row each response token belongs to (0, 1, ...)

    @property
    def num_tokens(self) -> int:
        return self.bounds[-1]

    def forward_kwargs(self) -> dict:
        """Keyword arguments for a Hugging Face causal LM whose attention is PACKED_ATTENTION; they reach
        every attention call (FlashAttention's names for the variable-length boundaries)."""
        return dict(input_ids=self.ids, position_ids=self.positions, use_cache=False,
                    cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                    max_length_q=self.max_len, max_length_k=self.max_len, tether_bounds=self.bounds)


def per_token(advantages: torch.Tensor | list[list[float]], trajs: list[Trajectory]) -> list[list[float]]:
    """Each trajectory's advantage of every response token: a (N,) tensor broadcast (outcome advantages), or
    per-token lists as given (GAE)."""
    if isinstance(advantages, torch.Tensor):
        return [[a] * len(t.response_ids) for t, a in zip(trajs, advantages.tolist())]
    return [list(a) for a in advantages]


def pack(trajs: list[Trajectory], advantages: torch.Tensor | list[list[float]], device: torch.device) -> PackedBatch:
    """Concatenate `trajs` (with their (len(trajs),) `advantages`, or per-token lists) into one row on `device`."""
    ids: list[int] = []
    positions: list[int] = []
    bounds = [0]
    predict_at: list[int] = []
    targets: list[int] = []
    behav: list[float] = []
    mask: list[float] = []
    adv: list[float] = []
    seq: list[int] = []
    for t, a in zip(trajs, per_token(advantages, trajs)):
        start, p, n = len(ids), len(t.prompt_ids), len(t.response_ids)
        ids += t.prompt_ids + t.response_ids
        positions += range(p + n)
        bounds.append(len(ids))
        predict_at += range(start + p - 1, start + p + n - 1)  # the output at position j predicts token j + 1
        targets += t.response_ids
        behav += t.logp_behav
        mask += t.loss_weights()
        adv += a
        seq += [seq[-1] + 1 if seq else 0] * n  # numbered among sequences with response tokens: ids < R
    lens = [b - a for a, b in zip(bounds, bounds[1:])]

    def put(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return PackedBatch(
        ids=put([ids], torch.long), positions=put([positions], torch.long),
        cu_seqlens=put(bounds, torch.int32), bounds=bounds, max_len=max(lens),
        predict_at=put(predict_at, torch.long), targets=put(targets, torch.long),
        behav=put([behav], torch.float32), mask=put([mask], torch.float32), advantages=put([adv], torch.float32),
        seq_index=put([seq], torch.long),
    )


@dataclass
class PaddedBatch:
    """The padded layout (trainer.pack_sequences=false, kept as the reference the packed path is tested
    against): prompts left-padded and responses right-padded, so every response starts in column P and
    the logits predicting response tokens are the last T + 1 positions but one."""

    ids: torch.Tensor  # (B, P + T)
    attn: torch.Tensor  # (B, P + T)
    positions: torch.Tensor  # (B, P + T) positions as the engine saw them
    targets: torch.Tensor  # (B, T)
    behav: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) 1 on trained response tokens, 0 on padding
    advantages: torch.Tensor  # (B, T)
    seq_index = None  # one sequence per row


def pad(trajs: list[Trajectory], advantages: torch.Tensor | list[list[float]], device: torch.device) -> PaddedBatch:
    P = max(len(t.prompt_ids) for t in trajs)
    T = max(len(t.response_ids) for t in trajs)
    ids = torch.zeros(len(trajs), P + T, dtype=torch.long)  # (B, P + T)
    attn = torch.zeros_like(ids)
    targets = torch.zeros(len(trajs), T, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(trajs), T)  # (B, T)
    behav = torch.zeros(len(trajs), T)  # (B, T)
    for b, t in enumerate(trajs):
        p, n = len(t.prompt_ids), len(t.response_ids)
        ids[b, P - p : P + n] = torch.tensor(t.prompt_ids + t.response_ids)
        attn[b, P - p : P + n] = 1
        targets[b, :n] = torch.tensor(t.response_ids)
        mask[b, :n] = torch.tensor(t.loss_weights())
        behav[b, :n] = torch.tensor(t.logp_behav)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    adv = torch.zeros(len(trajs), T)  # (B, T)
    for b, a in enumerate(per_token(advantages, trajs)):
        adv[b, : len(a)] = torch.tensor(a)
    return PaddedBatch(*(x.to(device) for x in (ids, attn, positions, targets, behav, mask, adv)))


def per_trajectory(values: torch.Tensor, trajs: list[Trajectory], batch: PackedBatch | PaddedBatch) -> list[list[float]]:
    """Per-token values of a batch ((1, R) packed or (B, T) padded) split back into one list per trajectory."""
    if isinstance(batch, PaddedBatch):
        return [values[b, : len(t.response_ids)].tolist() for b, t in enumerate(trajs)]
    flat = values.reshape(-1).tolist()
    out, start = [], 0
    for t in trajs:
        out.append(flat[start : start + len(t.response_ids)])
        start += len(t.response_ids)
    return out


# ---- attention that stays within each packed sequence ------------------------------------------

def _varlen():
    """torch's FlashAttention variable-length entry point and how to ask it for causal/GQA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


_VARLEN = _varlen()


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                     tether_bounds=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Hugging Face attention interface: query (1, H, T, D), key/value (1, H_kv, T, D) -> (1, T, H, D).

    Causal attention within each sequence of the packed row (boundaries `tether_bounds`), nothing
    across them and no padding anywhere."""
    if tether_bounds is None:
        raise RuntimeError(f"{PACKED_ATTENTION} attention needs packed inputs (trainer/packing.py PackedBatch)")
    if dropout:
        raise RuntimeError("attention dropout is not supported in the packed path; keep trainer.disable_dropout=true")
    groups = query.shape[1] // key.shape[1]
    if _VARLEN is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        varlen_attn, has_window, has_gqa = _VARLEN
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (T, H, D)
        if groups > 1 and not has_gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {"window_size": (-1, 0)} if has_window else {"is_causal": True}
        if groups > 1 and has_gqa:
            extra["enable_gqa"] = True
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling, **extra)
        return out.unsqueeze(0), None  # (1, T, H, D)
    outs = []
    for a, b in zip(tether_bounds, tether_bounds[1:]):
        outs.append(F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                   scale=scaling, enable_gqa=groups > 1))  # (1, H, n, D)
    return torch.cat(outs, dim=2).transpose(1, 2), None  # (1, T, H, D)


def _no_mask(*args, **kwargs):
    return None  # attention stays within sequences by construction: no mask to build


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _no_mask)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Make every attention layer of a Hugging Face model (also under a PEFT wrapper) attend within
    packed sequences. Masks are not built for it (transformers skips them for a custom name)."""
    register_attention()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = PACKED_ATTENTION
