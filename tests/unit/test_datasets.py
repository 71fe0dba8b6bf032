"""Problems from local JSONL/Parquet files (rewards/datasets.py)."""

import json
from pathlib import Path

import pytest

from configs.schema import ConfigError
from rewards.arithmetic import Problem
from rewards.datasets import load_problems

REPO = Path(__file__).resolve().parents[2]
GOOD = [{"q": f"What is {i} + 1?", "a": i + 1, "extra": "x"} for i in range(10)]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def load(path: str, **kw):
    kw = {"eval_path": None, "eval_size": 2, "seed": 0, **kw}
    return load_problems(path, "q", "a", **kw)


def test_jsonl_loads_and_answers_are_strings(tmp_path):
    train, eval_, stats = load(write_jsonl(tmp_path / "d.jsonl", GOOD))
    assert stats == {"rows": 10, "malformed": 0, "malformed_examples": []}
    assert len(train) == 8 and len(eval_) == 2
    everything = sorted(train + eval_, key=lambda p: int(p.answer))
    assert everything == [Problem(f"What is {i} + 1?", str(i + 1)) for i in range(10)]


def test_parquet_loads(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": [r["q"] for r in GOOD], "a": [r["a"] for r in GOOD]}), path)
    train, eval_, stats = load(str(path), eval_size=3)
    assert stats["rows"] == 10 and stats["malformed"] == 0
    assert len(train) == 7 and len(eval_) == 3
    assert {p.answer for p in train + eval_} == {str(i + 1) for i in range(10)}


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    rows = GOOD[:4] + [
        '{"q": "broken", "a": ',            # line 5: not JSON
        {"q": None, "a": 3},                # null question
        {"q": "   ", "a": 3},               # empty question
        {"q": "list answer", "a": [1, 2]},  # not a string or number
        {"q": "no answer"},                 # answer missing
        {"q": "bool answer", "a": True},    # a bool is not a number
        "[1, 2]",                           # line 11: JSON, not an object
        '{"q": "nan", "a": NaN}',           # Python's json accepts NaN; JSON (and Arrow) do not
        "",                                 # blank line: not a row at all
        {"q": "float answer", "a": 2.5},    # fine: numbers become strings
    ]
    train, eval_, stats = load(write_jsonl(tmp_path / "d.jsonl", rows), eval_size=1)
    assert stats["rows"] == 13 and stats["malformed"] == 8
    assert len(train) + len(eval_) == 5
    assert "2.5" in {p.answer for p in train + eval_}
    assert stats["malformed_examples"][0] == f"{tmp_path}/d.jsonl line 5: not valid JSON (Expecting value: line 1 column 22 (char 21))"
    assert any("line 11: not a JSON object" in r for r in stats["malformed_examples"])
    assert len(stats["malformed_examples"]) == 5  # only the first few reasons are kept


def test_mixed_int_and_float_answers_keep_integers_integral(tmp_path):
    # Arrow reads [72, 2.5] as float64; 72 must come back as "72", not "72.0"
    train, eval_, _ = load(write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": 72}, {"q": "y", "a": 2.5}]), eval_size=1)
    assert sorted(p.answer for p in train + eval_) == ["2.5", "72"]


def test_missing_column_names_the_key_and_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    with pytest.raises(ConfigError) as e:
        load_problems(path, "question", "a", eval_path=None, eval_size=2, seed=0)
    assert str(e.value) == (f"task.prompt_key='question' is not a column of {path} (columns: q, a, extra); "
                            "set task.prompt_key to one of them")
    with pytest.raises(ConfigError, match=r"^task.answer_key='answer' is not a column"):
        load_problems(path, "q", "answer", eval_path=None, eval_size=2, seed=0)


@pytest.mark.parametrize("name,content,match", [
    ("empty.jsonl", "", "has no rows"),
    ("blank.jsonl", "\n\n", "has no rows"),
    ("bad.jsonl", "not json\n{]\n", "has no usable rows: all 2 are malformed"),
    ("nulls.jsonl", '{"q": null, "a": 1}\n{"q": "x", "a": ""}\n', "has no usable rows: all 2 are malformed"),
])
def test_empty_or_all_malformed_file_is_an_error(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=match) as e:
        load(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_file_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^task.path='.*nope.jsonl' is not a file"):
        load(str(tmp_path / "nope.jsonl"))
    csv = tmp_path / "d.csv"
    csv.write_text("q,a\n1,2\n")
    with pytest.raises(ConfigError, match=r"^task.path=.* unsupported suffix '.csv'; use a .jsonl or .parquet file"):
        load(str(csv))
    broken = tmp_path / "d.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match=r"^task.path=.* could not be read"):
        load(str(broken))
    good = write_jsonl(tmp_path / "d.jsonl", GOOD)
    with pytest.raises(ConfigError, match=r"^task.eval_path='.*missing.jsonl' is not a file"):
        load(good, eval_path=str(tmp_path / "missing.jsonl"))


def test_hold_out_sizes_and_determinism(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    for eval_size in (0, 1, 9):
        train, eval_, _ = load(path, eval_size=eval_size, seed=3)
        assert len(eval_) == eval_size and len(train) == 10 - eval_size
        assert not {p.question for p in train} & {p.question for p in eval_}
    assert load(path, eval_size=3, seed=3) == load(path, eval_size=3, seed=3)
    assert load(path, eval_size=3, seed=3)[1] != load(path, eval_size=3, seed=4)[1]
    with pytest.raises(ConfigError, match=r"^task.num_eval=10 leaves no training rows: .* has 10 usable rows"):
        load(path, eval_size=10)
    with pytest.raises(ConfigError, match=r"^task.num_eval=-1 must be >= 0"):
        load(path, eval_size=-1)


def test_separate_eval_file(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", GOOD)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"q": "held out", "a": "7"}, {"q": None, "a": 1}])
    train, eval_, stats = load(train_path, eval_path=eval_path, eval_size=99)  # eval_size unused with eval_path
    assert len(train) == 10 and eval_ == [Problem("held out", "7")]
    assert stats["rows"] == 12 and stats["malformed"] == 1
    assert "eval.jsonl row" not in stats["malformed_examples"][0]  # JSONL rows are named by line
    assert stats["malformed_examples"][0].endswith("eval.jsonl line 2: q is missing or null")


def test_shipped_gsm8k_mini_loads_cleanly():
    train, eval_, stats = load_problems(str(REPO / "rewards/data/gsm8k_mini.jsonl"), "question", "answer",
                                        eval_path=None, eval_size=8, seed=1234)
    assert stats == {"rows": 40, "malformed": 0, "malformed_examples": []}
    assert len(train) == 32 and len(eval_) == 8
    assert all("\n#### " in p.answer for p in train + eval_)
