"""Reward models: a causal LM with a one-output sequence-classification head, scoring a whole sequence by
its head's output at the last token (docs/design.md section 3b).

    model = load_reward_model(path, device)                   # AutoModelForSequenceClassification, num_labels=1
    rewards = reward_forward(model, ids, attention_mask)      # (B,) the head at each row's last real token
    scores = score_sequences(model, sequences, pad_id, max_tokens=8192)   # batched by a token budget, no grad
    norm = RunningNorm(); norm.update(scores); norm.normalize(x)

The last token is found from the attention mask of right-padded rows, not from the pad token id (as
Hugging Face's own pooling does): SmolLM2 and many chat models pad with their EOS token, and a
response that ended with EOS would then be scored one token early. Training (trainer/rm_train.py)
and scoring (rewards/scorer.py) use the same `reward_forward`, so a reward model scores at RL time
exactly as it was trained.
"""

from __future__ import annotations

import math

import torch


def load_reward_model(path: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                      num_labels: int = 1) -> torch.nn.Module:
    """A reward model from a Hugging Face directory: one saved by scripts/train_rm.py (or any sequence-
    classification model with one output), or a causal LM, which gets a fresh scalar head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
    if model.config.pad_token_id is None:  # saved with the model: transformers needs one for batches
        tokenizer = AutoTokenizer.from_pretrained(path)
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    decoder_and_head(model)  # fails now, with the reason, for a model whose head we cannot call
    return model.to(device)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder, scalar head) of a sequence-classification model, also under a PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = getattr(inner, "score", None)
    if decoder is None or head is None:
        raise ValueError(f"{type(inner).__name__}: a reward model needs a decoder and a `score` head (the layout of "
                         "Llama, Qwen, Mistral, SmolLM sequence-classification models)")
    return decoder, head


def reward_forward(model: torch.nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) float32 rewards of right-padded rows `ids` (B, T): the scalar head at each row's last token."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
    last = attention_mask.sum(dim=-1) - 1  # (B,) right padding: the last real token
    pooled = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # (B, H)
    return head(pooled).squeeze(-1).float()  # (B,)


def pad_right(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, T), the rows right-padded with `pad_id`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into padded batches of at most `max_tokens` (rows x longest row), longest first so
    that rows of a batch have similar lengths; a row longer than the budget gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def score_sequences(model: torch.nn.Module, sequences: list[list[int]], pad_id: int, max_tokens: int = 8192) -> list[float]:
    """The reward of every token sequence (prompt + response), in batches of at most `max_tokens` padded tokens."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("score_sequences: an empty sequence has no last token to score")
    device = next(model.parameters()).device
    out = [0.0] * len(sequences)
    for batch in token_budget_batches([len(s) for s in sequences], max_tokens):
        ids, mask = pad_right([sequences[i] for i in batch], pad_id, device)
        for i, r in zip(batch, reward_forward(model, ids, mask).tolist()):
            out[i] = r
    return out


class RunningNorm:
    """Running mean and standard deviation of every score seen (Welford), to normalise a model reward whose
    scale is arbitrary: (x - mean) / (std + eps), with the batch being normalised already counted."""

    def __init__(self, eps: float = 1e-6) -> None:
        self.count, self.mean, self.m2, self.eps = 0, 0.0, 0.0, eps

    def update(self, values: list[float]) -> None:
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def normalize(self, values: list[float]) -> list[float]:
        return [(x - self.mean) / (self.std + self.eps) for x in values]

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
