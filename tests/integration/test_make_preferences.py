"""scripts/make_preferences.py with the tiny model on the transformers engine: its pair files load with
rewards/preferences.py, every pair puts a response the reward marks correct against one it marks wrong
to the same question, eval questions are not train questions, and meta.json counts what the files hold.

The tiny model is random, so the rule reward marks every answer wrong and gives no pair: the run that
checks the pairs uses --reward text_hash (a pseudo-random verdict fixed by the text), the run with the
rule reward checks that no pair makes a clear error instead of empty files."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from rewards.arithmetic import make_splits
from rewards.preferences import load_preferences
from rewards.text_hash import text_hash_reward

REPO = Path(__file__).resolve().parents[2]
QUESTIONS, SAMPLES, PAIRS = 6, 4, 2


def _script():
    spec = importlib.util.spec_from_file_location("make_preferences", REPO / "scripts" / "make_preferences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_load_and_match_meta(tmp_path, tiny_model_dir):
    out = tmp_path / "prefs"
    argv = ["--engine", "hf", "--model", "tiny", "--num-questions", str(QUESTIONS), "--samples", str(SAMPLES),
            "--eval-frac", "0.34", "--reward", "text_hash", "--seed", "3", "--out-dir", str(out)]
    assert _script().main(argv) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"] == "python scripts/make_preferences.py " + " ".join(argv)
    assert meta["model"] == "tiny" and meta["reward"] == "text_hash"
    assert meta["sampling"] == {"samples": SAMPLES, "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 32, "seed": 3}
    q = meta["questions"]
    assert (q["train"], q["eval"]) == (4, 2) and q["mixed"] + q["all_correct"] + q["all_wrong"] == QUESTIONS
    r = meta["responses"]
    assert r["responses"] == QUESTIONS * SAMPLES and meta["accuracy"] == r["correct"] / r["responses"]

    train, eval_, stats = load_preferences(str(out / "train.jsonl"), eval_path=str(out / "eval.jsonl"), eval_size=0, seed=0)
    assert stats["malformed"] == 0 and stats["rows"] == len(train) + len(eval_)
    assert meta["pairs"] == {"train": len(train), "eval": len(eval_)} and train and eval_
    assert len(train) + len(eval_) <= PAIRS * q["mixed"]

    answers = {p.question: p.answer for p in make_splits(1234, 700, 100, 20, "+-")[0][:QUESTIONS]}
    rows = [json.loads(line) for split in ("train", "eval") for line in (out / f"{split}.jsonl").read_text().splitlines()]
    for pair, row in zip(train + eval_, rows):
        assert row["prompt"] == pair.prompt and answers[pair.prompt] == row["answer"]  # the task's own questions
        assert text_hash_reward(pair.chosen, "") >= 0.5 > text_hash_reward(pair.rejected, "")
    per_question = Counter(p.prompt for p in train + eval_)
    assert max(per_question.values()) <= PAIRS and len(per_question) <= q["mixed"]
    assert len({(p.prompt, p.chosen, p.rejected) for p in train + eval_}) == len(train) + len(eval_)  # no pair twice
    train_q, eval_q = {p.prompt for p in train}, {p.prompt for p in eval_}
    assert not train_q & eval_q and len(train_q) <= q["train"] and len(eval_q) <= q["eval"]


def test_rule_reward_on_a_random_model_gives_no_pair_and_says_so(tmp_path, tiny_model_dir):
    out = tmp_path / "prefs"
    with pytest.raises(SystemExit) as e:
        _script().main(["--engine", "hf", "--model", "tiny", "--num-questions", "2", "--samples", "2",
                        "--max-new-tokens", "4", "--eval-frac", "0", "--out-dir", str(out)])
    assert str(e.value).startswith("error: no train pair: of its questions none had both a correct and a wrong "
                                   "answer (answer accuracy 0.000")
    assert not out.exists()  # no file that would pass for a preference set


def test_make_pairs_uses_every_response_before_repeating():
    import random

    pairs = _script().make_pairs(["c1", "c2"], ["w1", "w2", "w3", "w4"], 3, random.Random(0))
    assert len(pairs) == 3 and len({w for _, w in pairs}) == 3 and {c for c, _ in pairs} == {"c1", "c2"}
    assert _script().make_pairs(["c"], ["w"], 5, random.Random(0)) == [("c", "w")]
    assert _script().make_pairs([], ["w"], 5, random.Random(0)) == []
