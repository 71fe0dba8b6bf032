"""TRL's GRPOTrainer side by side with tether in `scripts/bench.py pipeline`: the same model, prompts,
forced response lengths, group and batch sizes, generated with TRL's own vLLM (GPU) or `generate`."""

from __future__ import annotations

import resource
import time
from pathlib import Path


class _ForcedLengths:
    """A transformers logits processor: row i ends after exactly lengths[i] tokens, the last of them EOS
    (TRL ends a completion at its first EOS and trains on it), EOS masked before. Set `lengths` and
    `prompt_len` before each generate call (prompts are left-padded to one width)."""

    def __init__(self, eos_ids: list[int]) -> None:
        self.eos_ids = eos_ids
        self.lengths = None  # (N,)
        self.prompt_len = 0

    def __call__(self, input_ids, scores):  # input_ids (N, prompt_len + t), scores (N, V)
        import torch

        t = input_ids.shape[1] - self.prompt_len  # tokens generated so far, the same in every row
        lengths = self.lengths.to(scores.device)
        eos = torch.tensor(self.eos_ids, device=scores.device)
        early = (t < lengths - 1).nonzero(as_tuple=True)[0]  # rows that must not stop yet
        scores[early.unsqueeze(1), eos] = float("-inf")
        last = t == lengths - 1  # rows whose next token is their last: EOS
        scores[last] = float("-inf")
        scores[last, eos[0]] = 0.0
        return scores


class _TRLLengthHook:
    """Forces TRL's generations to the workload's lengths. Row r of generate call c is sample r % G of
    group c * (rows / G) + r // G: TRL repeats each prompt G times in dataset order (shuffle off), so
    group `seq` gets the same prompt and lengths as group `seq` of a tether run."""

    def __init__(self, cfg, eos_ids: list[int]) -> None:
        self.cfg = cfg
        self.calls = 0
        self.response_tokens = 0
        self.processor = _ForcedLengths(eos_ids)

    def next_lengths(self, rows: int) -> list[int]:
        from rollout.forced_length import forced_length_of

        g = self.cfg.trainer.group_size
        first = self.calls * (rows // g)
        lengths = [forced_length_of(self.cfg, first + r // g, r % g) for r in range(rows)]
        self.calls += 1
        self.response_tokens += sum(lengths)
        return lengths

    def wrap_transformers(self, model) -> None:
        import torch
        from transformers import LogitsProcessorList

        generate = model.generate

        def forced(*args, input_ids, **kwargs):
            self.processor.lengths = torch.tensor(self.next_lengths(input_ids.shape[0]))  # (N,)
            self.processor.prompt_len = input_ids.shape[1]
            return generate(*args, input_ids=input_ids, logits_processor=LogitsProcessorList([self.processor]), **kwargs)

        model.generate = forced

    def wrap_vllm(self, llm) -> None:
        import msgspec

        generate = llm.generate

        def forced(prompts, sampling_params=None, **kwargs):
            params = [msgspec.structs.replace(sampling_params, max_tokens=n, min_tokens=n, ignore_eos=True)
                      for n in self.next_lengths(len(prompts))]
            return generate(prompts, sampling_params=params, **kwargs)

        llm.generate = forced


def _trl_args(cfg, use_vllm: bool, workdir: Path):
    """GRPOConfig matching the run: one generation of B completions (B/G prompts x G) per optimizer step,
    micro-batches of trainer.micro_batch_size, same lr, clip, temperature, no KL, no dropout, no
    gradient checkpointing (tether has none either), constant learning rate."""
    import torch
    from trl import GRPOConfig

    t, a = cfg.trainer, cfg.algorithm
    on_gpu = torch.cuda.is_available()
    max_len = cfg.rollout.forced_length_max or cfg.rollout.max_new_tokens
    return GRPOConfig(
        output_dir=str(workdir / "trl"), use_cpu=not on_gpu, bf16=on_gpu and cfg.model.dtype == "bfloat16",
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.batch_size // t.micro_batch_size,
        num_generations=t.group_size, max_completion_length=max_len, temperature=cfg.rollout.temperature,
        top_p=1.0, top_k=0, learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=t.weight_decay, max_grad_norm=t.grad_clip, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        epsilon=a.eps_low, epsilon_high=a.eps_high, beta=0.0, num_iterations=1, max_steps=t.max_steps,
        shuffle_dataset=False, seed=cfg.seed, disable_dropout=True, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32}, use_vllm=use_vllm, vllm_mode="colocate",
        vllm_max_model_length=cfg.rollout.max_model_len, vllm_gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
    )


def trl_side_by_side(cfg, model_dir: str, workdir: Path, generation: str, order: list[int]) -> dict | str:
    """TRL's GRPOTrainer on the same model, prompts (`order`: the prompt of each group, as tether's data
    cursor hands them out), forced lengths, group and batch sizes, in this process. Generation by
    transformers `generate` (CPU, or `--trl-generation transformers`) or TRL's colocated vLLM."""
    try:
        import trl
    except ImportError:
        return "not installed"
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from rewards.tasks import build_task

    task = build_task(cfg.task)
    system = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
    rows = [{"prompt": [*system, {"role": "user", "content": task.train[i].question}], "answer": task.train[i].answer}
            for i in order]

    def reward(prompts, completions, answer, **kwargs) -> list[float]:
        return [task.reward_fn(c[-1]["content"], a) for c, a in zip(completions, answer)]

    use_vllm = generation == "vllm" or (generation == "auto" and torch.cuda.is_available())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=reward, args=_trl_args(cfg, use_vllm, workdir),
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    hook = _TRLLengthHook(cfg, trainer.eos_token_ids)
    if use_vllm:
        hook.wrap_vllm(trainer.vllm_generation.llm)
    else:
        hook.wrap_transformers(trainer.model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    if hook.calls != cfg.trainer.max_steps:
        raise RuntimeError(f"TRL generated {hook.calls} times for {cfg.trainer.max_steps} steps; the forced-length "
                           "hook did not see every generation, its numbers would not be comparable")
    tokens = trainer.state.num_input_tokens_seen  # TRL's own count: prompt + completion tokens trained on
    memory = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # peak RSS (KiB on Linux)
    return {"version": trl.__version__, "generation": "vllm (colocated)" if use_vllm else "transformers generate",
            "steps": trainer.state.global_step, "consumed_tokens": tokens, "forced_response_tokens": hook.response_tokens,
            "train_time_s": seconds, "effective_tokens_per_s": tokens / seconds, "process_memory_peak_gib": memory}
