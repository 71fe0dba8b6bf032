"""Preference pairs from local JSONL/Parquet files and their token ids (rewards/preferences.py)."""

import json
from pathlib import Path

import pytest

from configs.schema import ConfigError
from rewards.preferences import PreferencePair, load_preferences, prompt_ids, render_pair, response_ids
from rewards.tasks import Task, render_prompt

REPO = Path(__file__).resolve().parents[2]
TEXT = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2), "extra": "x"} for i in range(10)]
MESSAGES = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}],
            "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}
USER, BOT = MESSAGES["prompt"][1:], MESSAGES["chosen"]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def load(path: str, **kw):
    return load_preferences(path, **{"eval_size": 2, "seed": 0, **kw})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_text_rows_load(tmp_path):
    train, eval_, stats = load(write_jsonl(tmp_path / "p.jsonl", TEXT))
    assert stats == {"rows": 10, "malformed": 0, "malformed_examples": []}
    assert len(train) == 8 and len(eval_) == 2
    assert sorted(train + eval_, key=lambda p: int(p.chosen)) == [
        PreferencePair(f"What is {i} + 1?", str(i + 1), str(i + 2)) for i in range(10)]


def test_messages_and_text_rows_in_one_file_keep_their_values(tmp_path):
    # a column mixing text and lists: `datasets` alone would read the text "007" back as the number 7
    odd = {"prompt": "Say 007.", "chosen": "007", "rejected": "null"}
    extra_key = {**MESSAGES, "rejected": [{"role": "assistant", "content": "7", "name": "bot"}]}
    train, eval_, stats = load(write_jsonl(tmp_path / "p.jsonl", [MESSAGES, odd, extra_key, *TEXT[:2]]), eval_size=0)
    assert stats["malformed"] == 0 and eval_ == []
    assert PreferencePair("Say 007.", "007", "null") in train
    assert PreferencePair(MESSAGES["prompt"], MESSAGES["chosen"], MESSAGES["rejected"]) in train
    # only role and content are kept
    assert PreferencePair(MESSAGES["prompt"], MESSAGES["chosen"], [{"role": "assistant", "content": "7"}]) in train


def test_parquet_loads_text_and_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    text = tmp_path / "t.parquet"
    pq.write_table(pa.table({k: [r[k] for r in TEXT] for k in ("prompt", "chosen", "rejected")}), text)
    train, eval_, stats = load(str(text), eval_size=3)
    assert stats["rows"] == 10 and stats["malformed"] == 0 and len(train) == 7 and len(eval_) == 3
    messages = tmp_path / "m.parquet"
    second = {**MESSAGES, "chosen": [{"role": "assistant", "content": "five"}]}
    pq.write_table(pa.Table.from_pylist([MESSAGES, second]), messages)
    train, eval_, stats = load(str(messages), eval_size=1)
    assert stats["malformed"] == 0
    assert {p.chosen[0]["content"] for p in train + eval_} == {"5", "five"}
    assert all(p.prompt == MESSAGES["prompt"] for p in train + eval_)


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    rows = TEXT[:3] + [
        '{"prompt": "broken", "chosen": ',                            # line 4: not JSON
        {"prompt": "no rejected", "chosen": "1"},                     # key missing
        {"prompt": "   ", "chosen": "1", "rejected": "2"},            # empty prompt
        {"prompt": "same", "chosen": "4", "rejected": " 4 "},         # chosen == rejected
        {"prompt": "a number", "chosen": 5, "rejected": "6"},         # not text
        {"prompt": "mixed", "chosen": BOT, "rejected": "6"},          # text prompt, messages response
        {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": BOT, "rejected": BOT},  # no user turn last
        {"prompt": USER, "chosen": [{"role": "assistant", "content": "5"}] * 2, "rejected": BOT},  # two turns
        {"prompt": USER, "chosen": [{"content": "5"}], "rejected": BOT},  # no role
        {"prompt": USER, "chosen": BOT, "rejected": [{"role": "assistant", "content": "5"}]},  # same, as messages
        {"prompt": USER, "chosen": [], "rejected": BOT},              # empty list
        "[1, 2]",                                                     # line 15: not an object
        {"prompt": USER, "chosen": BOT, "rejected": [{"role": "assistant", "content": "6"}]},  # fine
    ]
    train, eval_, stats = load(write_jsonl(tmp_path / "p.jsonl", rows), eval_size=1)
    assert stats["rows"] == 16 and stats["malformed"] == 12
    assert len(train) + len(eval_) == 4
    file = f"{tmp_path}/p.jsonl"
    assert stats["malformed_examples"] == [
        f"{file} line 4: not valid JSON (Expecting value: line 1 column 32 (char 31))",
        f"{file} line 15: not a JSON object (a list)",  # JSONL lines are judged before any row's fields
        f"{file} line 5: rejected is missing or null",
        f"{file} line 6: prompt is empty",
        f"{file} line 7: chosen and rejected are the same response",
    ]



@pytest.mark.parametrize("row,reason", [
    ({"prompt": "a number", "chosen": 5, "rejected": "6"}, "chosen is of type int, not text or a messages list"),
    ({"prompt": "mixed", "chosen": BOT, "rejected": "6"},
     "prompt is text, chosen is messages, rejected is text; give all three as text or all three as messages"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": BOT, "rejected": BOT},
     "prompt's last turn has role 'assistant', not 'user'"),
    ({"prompt": USER, "chosen": BOT * 2, "rejected": BOT}, "chosen has 2 messages; a response is one assistant turn"),
    ({"prompt": USER, "chosen": [{"content": "5"}], "rejected": BOT},
     "chosen message 0 has role None, not one of system, user, assistant, tool"),
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": ["5"]}], "rejected": BOT},
     "chosen message 0 has content of type list, not text"),
    ({"prompt": USER, "chosen": ["5"], "rejected": BOT}, "chosen message 0 is of type str, not a {role, content} object"),
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": " "}], "rejected": BOT}, "chosen has an empty last turn"),
    ({"prompt": USER, "chosen": BOT, "rejected": [{"role": "assistant", "content": "5 "}]},
     "chosen and rejected are the same response"),
    ({"prompt": USER, "chosen": [], "rejected": BOT}, "chosen is empty"),
    ({"prompt": USER, "chosen": {"role": "assistant", "content": "5"}, "rejected": BOT},
     "chosen is of type dict, not text or a messages list"),
])
def test_each_malformed_reason(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [row, TEXT[0]])
    train, _, stats = load(path, eval_size=0)
    assert stats["malformed_examples"] == [f"{path} line 1: {reason}"] and len(train) == 1


def test_a_key_that_is_not_a_column_names_the_key_and_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", TEXT)
    with pytest.raises(ConfigError) as e:
        load(path, chosen_key="good")
    assert str(e.value) == (f"preferences.chosen_key='good' is not a column of {path} "
                            "(columns: prompt, chosen, rejected, extra); set preferences.chosen_key to one of them")
    with pytest.raises(ConfigError, match=r"^reward_model.rejected_key='bad' is not a column"):
        load(path, rejected_key="bad", config_key="reward_model")


def test_renamed_columns(tmp_path):
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in TEXT]
    train, eval_, _ = load(write_jsonl(tmp_path / "p.jsonl", rows), prompt_key="q", chosen_key="good", rejected_key="bad")
    assert len(train) == 8 and {p.prompt for p in train + eval_} == {r["prompt"] for r in TEXT}


def test_margin_column(tmp_path):
    rows = [{**r, "m": m} for r, m in zip(TEXT[:5], [1, 0.5, None, "2", True])]
    train, _, stats = load(write_jsonl(tmp_path / "p.jsonl", rows), eval_size=0, margin_key="m")
    assert sorted(p.margin for p in train) == [0.5, 1.0]
    assert [r.split(": ", 1)[1] for r in stats["malformed_examples"]] == [
        "m is missing or null", "m is of type str, not a number", "m is of type bool, not a number"]
    assert all(p.margin is None for p in load(write_jsonl(tmp_path / "p.jsonl", rows))[0])  # no margin_key: none
    with pytest.raises(ConfigError, match=r"^data.margin_key='margin' is not a column"):
        load(str(tmp_path / "p.jsonl"), margin_key="margin", config_key="data")


def test_file_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^preferences.path='.*nope.jsonl' is not a file"):
        load(str(tmp_path / "nope.jsonl"))
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,chosen,rejected\n1,2,3\n")
    with pytest.raises(ConfigError, match=r"^preferences.path=.* unsupported suffix '.csv'"):
        load(str(csv))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "1", "rejected": "1"}, "{]"])
    with pytest.raises(ConfigError) as e:
        load(bad)
    assert str(e.value) == (f"preferences.path={bad!r} has no usable rows: all 2 are malformed (first: {bad} line 2: "
                            "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
                            "(char 1))); check the file, preferences.prompt_key='prompt', "
                            "preferences.chosen_key='chosen' and preferences.rejected_key='rejected'")
    good = write_jsonl(tmp_path / "p.jsonl", TEXT)
    with pytest.raises(ConfigError, match=r"^preferences.eval_path='.*missing.jsonl' is not a file"):
        load(good, eval_path=str(tmp_path / "missing.jsonl"))


def test_eval_split_by_seed(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", TEXT)
    for eval_size in (0, 1, 9):
        train, eval_, _ = load(path, eval_size=eval_size, seed=3)
        assert len(eval_) == eval_size and len(train) == 10 - eval_size
        assert not {p.prompt for p in train} & {p.prompt for p in eval_}
    assert load(path, eval_size=3, seed=3) == load(path, eval_size=3, seed=3)
    assert load(path, eval_size=3, seed=3)[1] != load(path, eval_size=3, seed=4)[1]
    with pytest.raises(ConfigError, match=r"^preferences.num_eval=10 leaves no training rows: .* has 10 usable rows; "
                                          r"lower preferences.num_eval or set preferences.eval_path"):
        load(path, eval_size=10)


def test_eval_file(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", TEXT)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [MESSAGES, {"prompt": "x", "chosen": None, "rejected": "1"}])
    train, eval_, stats = load(train_path, eval_path=eval_path, eval_size=99)  # eval_size unused with eval_path
    assert len(train) == 10 and eval_ == [PreferencePair(MESSAGES["prompt"], MESSAGES["chosen"], MESSAGES["rejected"])]
    assert stats["rows"] == 12 and stats["malformed"] == 1
    assert stats["malformed_examples"] == [f"{eval_path} line 2: chosen is missing or null"]


def test_render_pair_text_is_the_tasks_prompt_then_the_response_and_eos(tokenizer):
    question = "What is 3 + 4? Answer with only the number."
    chosen, rejected = render_pair(PreferencePair(question, "7", "The answer is 8."), tokenizer)
    prompt = render_prompt(Task([], [], None, None, True), tokenizer, question)
    eos = tokenizer.eos_token_id
    assert chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt
    assert chosen[len(prompt):] == tokenizer("7", add_special_tokens=False)["input_ids"] + [eos]
    assert rejected[len(prompt):] == tokenizer("The answer is 8.", add_special_tokens=False)["input_ids"] + [eos]
    assert tokenizer.decode(chosen).endswith("<|im_start|>assistant\n7<|im_end|>")
    # the task's system prompt and chat_template switch, as render_prompt applies them
    for system, template in (("Be brief.", True), ("Be brief.", False), (None, False)):
        task = Task([], [], None, system, template)
        ids, _ = render_pair(PreferencePair(question, "7", "8"), tokenizer, system_prompt=system, chat_template=template)
        assert ids[:-2] == render_prompt(task, tokenizer, question) and ids[-1] == eos
    assert response_ids("7<|im_end|>", tokenizer) == response_ids("7", tokenizer)  # EOS is not doubled


def test_render_pair_messages_match_the_text_rendering(tokenizer):
    pair = PreferencePair(MESSAGES["prompt"], MESSAGES["chosen"], MESSAGES["rejected"])
    chosen, rejected = render_pair(pair, tokenizer)
    as_text = render_pair(PreferencePair("What is 2 + 3?", "5", "6"), tokenizer, system_prompt="Be brief.")
    assert (chosen, rejected) == as_text
    assert chosen[-1] == rejected[-1] == tokenizer.eos_token_id and chosen[:-2] == rejected[:-2]
    # a system_prompt is added only when the messages have none
    user_only = PreferencePair(MESSAGES["prompt"][1:], MESSAGES["chosen"], MESSAGES["rejected"])
    assert render_pair(user_only, tokenizer, system_prompt="Be brief.") == as_text
    assert prompt_ids(MESSAGES["prompt"], tokenizer, system_prompt="Other.") == prompt_ids(MESSAGES["prompt"], tokenizer)
    # without a template: the contents joined as render_prompt writes a system prompt and question
    assert prompt_ids(MESSAGES["prompt"], tokenizer, chat_template=False) == \
        render_prompt(Task([], [], None, "Be brief.", False), tokenizer, "What is 2 + 3?")


def test_shipped_example_loads_cleanly(tokenizer):
    train, eval_, stats = load_preferences(str(REPO / "rewards/data/preferences_example.jsonl"), eval_size=4, seed=0)
    assert stats["malformed"] == 0 and stats["rows"] >= 40
    pairs = train + eval_
    messages = [p for p in pairs if not isinstance(p.prompt, str)]
    assert len(messages) == 4 and len(pairs) - len(messages) >= 36
    for pair in pairs:
        chosen, rejected = render_pair(pair, tokenizer)
        assert chosen != rejected and chosen[-1] == rejected[-1] == tokenizer.eos_token_id
