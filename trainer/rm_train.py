"""Reward-model training (scripts/train_rm.py): a Bradley-Terry model on preference pairs (docs/design.md
section 3b).

    summary = train_reward_model(cfg)       # cfg: configs/rm_schema.py RMConfig

The model is a sequence-classification head with one output on the causal LM `model` names
(`AutoModelForSequenceClassification`, `num_labels=1`; with model.lora.rank > 0 PEFT adapters and the
head are trained). Each pair is rendered as the policy's rollouts are scored at RL time (the task's
prompt rendering, then the response and EOS: rewards/preferences.py), and its reward is the head's
output at the last token. A step takes trainer.batch_size pairs; their chosen and rejected sequences
go through micro-batches of at most trainer.max_tokens_per_micro_batch tokens, whole pairs each, each
micro-batch's loss weighted by its share of the batch's pairs, so the split never changes the gradient.
Packed rows (trainer.pack_sequences, the default) put every sequence of a micro-batch back to back in one
row with attention kept within each (trainer/packing.py), and read each sequence's reward at its last
position; padded rows are the reference they are tested against.

Every trainer.eval_every_steps steps and at the end: held-out pair accuracy (r_chosen > r_rejected) and
mean margin, in metrics.jsonl and wandb (`rm/eval_accuracy`, `rm/eval_margin`). Checkpoints as the
policy's (trainer/checkpoint.py: atomic, `checkpoint.resume=auto`); the result is exported as a Hugging
Face directory (`<output_dir>/hf`, LoRA merged) that `transformers` and tether's scorer
(`rewards.model.path`) load.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from configs.rm_schema import validate_rm
from configs.schema import ConfigError
from rewards.preferences import load_preferences, render_pair
from rewards.reward_model import decoder_and_head, load_reward_model, pad_right, reward_forward, token_budget_batches
from rewards.tasks import resolve_data_path
from rollout.models import resolve_model_dir
from trainer import checkpoint
from trainer.losses import bradley_terry_loss
from trainer.model import adamw
from trainer.monitor import Monitor
from trainer.packing import use_packed_attention

log = logging.getLogger("tether")


def packed_rewards(model: torch.nn.Module, sequences: list[list[int]], device) -> torch.Tensor:
    """(N,) rewards of `sequences` packed back to back into one row (the model uses packed attention)."""
    decoder, head = decoder_and_head(model)
    bounds = [0]
    for s in sequences:
        bounds.append(bounds[-1] + len(s))
    ids = torch.tensor([[t for s in sequences for t in s]], device=device)  # (1, T)
    positions = torch.tensor([[p for s in sequences for p in range(len(s))]], device=device)  # (1, T)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(len(s) for s in sequences)
    hidden = decoder(input_ids=ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                     max_length_q=longest, max_length_k=longest, tether_bounds=bounds).last_hidden_state  # (1, T, H)
    last = torch.tensor(bounds[1:], device=device) - 1  # (N,) each sequence's last position
    return head(hidden[0, last]).squeeze(-1).float()


class RewardModelTrainer:
    def __init__(self, cfg) -> None:
        self.cfg, tc = cfg, cfg.trainer
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model_dir = str(resolve_model_dir(cfg.model.name, cfg.model.path, cfg.cache_dir))
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = load_reward_model(model_dir, self.device, torch.float32)
        lc = cfg.model.lora
        if lc.rank > 0:  # adapters and the fresh head train; the export merges them
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                     target_modules=list(lc.target_modules), task_type="SEQ_CLS"))
        if tc.pack_sequences:
            use_packed_attention(model)
        self.model = model.train()
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.trained, lr=tc.lr, weight_decay=tc.weight_decay)
        warmup = tc.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        d = cfg.data
        train, eval_, stats = load_preferences(d.path, prompt_key=d.prompt_key, chosen_key=d.chosen_key,
                                               rejected_key=d.rejected_key, margin_key=d.margin_key,
                                               eval_path=d.eval_path, eval_size=d.num_eval, seed=cfg.seed,
                                               config_key="data")
        if stats["malformed"]:
            log.warning("%s: skipped %d malformed pairs of %d (first: %s)", d.path, stats["malformed"], stats["rows"],
                        "; ".join(stats["malformed_examples"][:3]))
        self.train_pairs = [self._render(p) for p in train]
        self.eval_pairs = [self._render(p) for p in eval_]
        per_epoch = max(1, len(self.train_pairs) // tc.batch_size)
        self.max_steps = tc.max_steps or per_epoch * tc.epochs
        self.step = 0

    def _render(self, pair) -> tuple[list[int], list[int], float]:
        chosen, rejected = render_pair(pair, self.tokenizer, self.cfg.data.system_prompt)
        return chosen, rejected, float(pair.margin or 0.0)

    def _batch_pairs(self, step: int) -> list[tuple[list[int], list[int], float]]:
        """The pairs of step `step` (1-based): a seeded shuffle per epoch, so a resumed run takes the same ones."""
        n, b = len(self.train_pairs), self.cfg.trainer.batch_size
        start = (step - 1) * b
        out = []
        for k in range(start, start + b):
            epoch, pos = divmod(k, n)
            order = list(range(n))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            out.append(self.train_pairs[order[pos]])
        return out

    def rewards(self, sequences: list[list[int]]) -> torch.Tensor:
        """(N,) rewards of sequences, packed or padded as configured."""
        if self.cfg.trainer.pack_sequences:
            return packed_rewards(self.model, sequences, self.device)
        ids, mask = pad_right(sequences, self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, self.device)
        return reward_forward(self.model, ids, mask)

    def _micro_batches(self, pairs) -> list[list[int]]:
        """Pair indices grouped by the token budget (both sequences of a pair in the same micro-batch)."""
        lengths = [len(c) + len(r) for c, r, _ in pairs]
        return token_budget_batches(lengths, self.cfg.trainer.max_tokens_per_micro_batch)

    def train_step(self) -> dict:
        tc = self.cfg.trainer
        t0 = time.perf_counter()
        pairs = self._batch_pairs(self.step + 1)
        self.optimizer.zero_grad(set_to_none=False)
        total = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "pairs": 0.0}
        for mb in self._micro_batches(pairs):
            chosen = [pairs[i][0] for i in mb]
            rejected = [pairs[i][1] for i in mb]
            r = self.rewards(chosen + rejected)  # (2m,)
            margin = torch.tensor([pairs[i][2] for i in mb], device=self.device)
            loss, sums = bradley_terry_loss(r[: len(mb)], r[len(mb):], margin if margin.any() else None,
                                            tc.center_rewards_coefficient)
            (loss * len(mb) / len(pairs)).backward()  # the batch mean, however it is split
            total["loss"] += loss.item() * len(mb) / len(pairs)
            for k in ("correct", "margin", "pairs"):
                total[k] += sums[k].item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, tc.grad_clip).item()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "rm/loss": total["loss"], "rm/accuracy": total["correct"] / total["pairs"],
                "rm/margin": total["margin"] / total["pairs"], "rm/grad_norm": grad_norm,
                "train/lr": self.scheduler.get_last_lr()[0], "time/step_s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out pair accuracy (r_chosen > r_rejected) and mean margin, in eval mode."""
        self.model.eval()
        correct, margin, n = 0.0, 0.0, 0
        try:
            for mb in self._micro_batches(self.eval_pairs):
                r = self.rewards([self.eval_pairs[i][0] for i in mb] + [self.eval_pairs[i][1] for i in mb])
                diff = r[: len(mb)] - r[len(mb):]
                correct += (diff > 0).sum().item()
                margin += diff.sum().item()
                n += len(mb)
        finally:
            self.model.train()
        return {"rm/eval_accuracy": correct / max(n, 1), "rm/eval_margin": margin / max(n, 1), "rm/eval_pairs": n}

    # ---- checkpoints and export ---------------------------------------------------------
    def save(self, output_dir: Path) -> Path:
        tmp = checkpoint.begin(output_dir, self.step)
        state = {"model": {k: v for k, v in self.model.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "steps": self.step, "rng": torch.get_rng_state()}
        torch.save(state, tmp / "trainer.pt")
        path = checkpoint.commit(tmp, self.step, {"step": self.step})
        checkpoint.prune(output_dir, self.cfg.checkpoint.keep_last)
        return path

    def load(self, path: Path) -> None:
        state = torch.load(path / "trainer.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        self.step = int(state["steps"])

    def export(self, out: Path) -> Path:
        """A Hugging Face directory: the (merged) model in float32 and the tokenizer."""
        model = self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.model
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        model.config._attn_implementation = "sdpa"  # the packed attention is the trainer's, not the scorer's
        model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out


def train_reward_model(cfg) -> dict:
    """Validate, load, train (resuming a checkpoint of output_dir with checkpoint.resume=auto), evaluate, export."""
    validate_rm(cfg)
    cfg.data.path = resolve_data_path(cfg.data.path)
    cfg.data.eval_path = resolve_data_path(cfg.data.eval_path)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        resume_from = checkpoint.resolve(cfg.checkpoint.resume, output_dir) if cfg.checkpoint.enabled else None
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    rm = RewardModelTrainer(cfg)
    cfg.trainer.max_steps = rm.max_steps  # resolved: the progress bar and config.yaml show it
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if resume_from is not None:
        rm.load(resume_from)
        log.info("resumed from %s: next step %d", resume_from, rm.step + 1)
    monitor = Monitor(cfg, output_dir, OmegaConf.to_container(cfg, resolve=True),
                      resume={"step": rm.step, "wandb_run_id": None} if resume_from else None)
    evals = [{"step": rm.step, **rm.evaluate()}]
    log.info("held-out pairs before training: accuracy %.3f, margin %.3f", evals[0]["rm/eval_accuracy"],
             evals[0]["rm/eval_margin"])
    every = cfg.trainer.eval_every_steps
    try:
        while rm.step < rm.max_steps:
            row = rm.train_step()
            if (every and rm.step % every == 0) or rm.step == rm.max_steps:
                evals.append({"step": rm.step, **rm.evaluate()})
                row.update(evals[-1])
            monitor.log(row)
            ck = cfg.checkpoint
            if ck.enabled and ((ck.every_steps and rm.step % ck.every_steps == 0) or rm.step == rm.max_steps):
                rm.save(output_dir)
        exported = str(rm.export(output_dir / "hf")) if cfg.checkpoint.export_hf else None
        summary = {"steps": rm.step, "train_pairs": len(rm.train_pairs), "eval_pairs": len(rm.eval_pairs),
                   "eval_accuracy_before": evals[0]["rm/eval_accuracy"], "eval_accuracy": evals[-1]["rm/eval_accuracy"],
                   "eval_margin": evals[-1]["rm/eval_margin"], "exported_to": exported}
        (output_dir / "evals.json").write_text(json.dumps(evals, indent=1))
        monitor.summary(summary)
        return summary
    finally:
        monitor.close()
