"""Log-probs and entropy of the sampled tokens from the final hidden states, in chunks: never a full
(tokens x vocabulary) float32 tensor, in the forward pass or the backward pass (docs/design.md section 6b).

    token_logprobs_from_hidden(hidden, weight, targets, temperature, chunk) -> (logp (R,), entropy (R,))
    LogProbHead(lm_head)     # replaces a causal LM's head: its "logits" output is logp of given targets

For R response positions with hidden states h (R, H) and the LM head W (V, H):
    z = h W^T / T,   logp = z[target] - logsumexp(z),   H = logsumexp(z) - sum softmax(z) * z
computed `chunk` rows at a time (z is (chunk, V), float32). The backward pass recomputes each
chunk's z instead of keeping it (as Liger's fused linear cross-entropy does):
    d logp / d z = onehot(target) - softmax(z)
    grad_h = (g * (onehot - p) / T) W,   grad_W = sum over chunks (g * (onehot - p) / T)^T h
so the memory held for backward is h and W themselves. The entropy is a diagnostic (no gradient).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 1024


class _ChunkedTokenLogProb(torch.autograd.Function):
    """Matmuls in the dtype of `hidden` (the caller casts the weight to it), softmax in float32. Autocast is
    off inside, so the backward pass recomputes exactly the z of the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk: int, want_entropy: bool):
        n, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 in tests
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        entropy = torch.empty(n, dtype=acc, device=hidden.device) if want_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                z = (hidden[s : s + chunk] @ weight.T).to(acc) / temperature  # (c, V)
                lse_c = torch.logsumexp(z, dim=-1)  # (c,)
                lse[s : s + chunk] = lse_c
                logp[s : s + chunk] = z.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse_c
                if want_entropy:
                    p = torch.softmax(z, dim=-1)  # (c, V)
                    pz = torch.where(p > 0, p * z, torch.zeros_like(z))  # 0 * -inf (a banned token) counts as 0
                    entropy[s : s + chunk] = lse_c - pz.sum(dim=-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        if want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk]  # (c, H)
                z = (h @ weight.T).to(acc) / t  # (c, V), recomputed
                dz = torch.exp(z - lse[s : s + chunk, None]).neg_()  # (c, V) -softmax
                dz.scatter_add_(-1, targets[s : s + chunk, None], torch.ones_like(dz[:, :1]))  # onehot - softmax
                dz.mul_(grad_logp[s : s + chunk, None] / t)  # d loss / d (h W^T)
                dz = dz.to(hidden.dtype)
                if need_h:
                    grad_hidden[s : s + chunk] = dz @ weight  # (c, H)
                if need_w:
                    grad_weight += (dz.T @ h).to(acc)  # (V, H); summed over chunks in float32
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def token_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               temperature: float = 1.0, chunk: int = DEFAULT_CHUNK,
                               want_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(R,) float32 (float64 for float64 inputs) log-probs of `targets` under softmax(hidden @ weight^T / temperature), and (R,) entropy
    of that distribution (None unless asked; no gradient). hidden (R, H), weight (V, H), targets (R,)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 (rollout.temperature)")
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty + 0 * hidden.sum() + 0 * weight.sum(), (empty if want_entropy else None)
    return _ChunkedTokenLogProb.apply(hidden, weight, targets, float(temperature), int(chunk), want_entropy)


class LogProbHead(torch.nn.Module):
    """Stands in for a causal LM's `lm_head` (the same weight Parameter, so tying, FSDP sharding and the
    parameter names stay as they were). Before each forward the caller sets `targets` (R,) and
    `temperature`; the model is called with `logits_to_keep` = the R positions that predict them, so the
    head receives their hidden states (1, R, H) and returns logp (1, R) as the model's "logits". The
    entropy of each position's distribution is left in `entropy` (1, R) when `want_entropy` is set.

    Running inside the model's forward matters under FSDP2: the weight is unsharded there."""

    def __init__(self, lm_head: torch.nn.Linear, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("LogProbHead: an LM head with a bias is not supported")
        self.weight = lm_head.weight
        self.chunk = chunk
        self.targets: torch.Tensor | None = None
        self.temperature = 1.0
        self.want_entropy = False
        self.entropy: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            raise RuntimeError("LogProbHead: set `targets` before the forward pass")
        h = hidden.reshape(-1, hidden.shape[-1])  # (R, H)
        logp, entropy = token_logprobs_from_hidden(h, self.weight.to(h.dtype), self.targets, self.temperature,
                                                   self.chunk, self.want_entropy)
        self.entropy = None if entropy is None else entropy.unsqueeze(0)
        return logp.unsqueeze(0).clone()  # (1, R); a fresh tensor, not a view (FSDP2 hooks the output for backward)


def install_logprob_head(model: torch.nn.Module, chunk: int = DEFAULT_CHUNK) -> LogProbHead:
    """Replace the LM head of a Hugging Face causal LM (also under a PEFT wrapper) by a LogProbHead."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = LogProbHead(base.get_output_embeddings(), chunk)
    base.set_output_embeddings(head)
    return head
