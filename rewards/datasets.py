"""Problems from a local JSONL or Parquet file, read through Hugging Face `datasets` (no hub access).

Each row gives a question (`prompt_key`) and a reference answer (`answer_key`). A row whose
question or answer is missing, null, empty or not a string/number is skipped and counted, as
is a JSONL line that is not a JSON object: one bad row in 7,000 should not stop a run, but
the count is reported so that a badly keyed file (every row skipped) is noticed. Problems
with the file itself (missing, wrong suffix, a key that is not a column, nothing usable)
raise `ConfigError` naming the key to fix.

`datasets`' JSON reader fails on the whole file at the first broken line, so JSONL files are
pre-scanned line by line with `json.loads`; only the well-formed lines reach `datasets`.
The "json" and "parquet" builders are packaged with `datasets` and read local files only:
nothing is fetched from the Hub. Their Arrow cache goes to a temporary directory, not
~/.cache, and is dropped once the rows are in memory.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
from pathlib import Path

from configs.schema import ConfigError
from rewards.arithmetic import Problem

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".parquet")
MAX_EXAMPLES = 5  # malformed-row reasons kept in the stats


def load_problems(
    path: str, prompt_key: str, answer_key: str, *, eval_path: str | None, eval_size: int, seed: int
) -> tuple[list[Problem], list[Problem], dict]:
    """(train, eval, stats) from `path`, and from `eval_path` when given.

    Without `eval_path`, `eval_size` (task.num_eval) usable rows are held out as eval, chosen
    by a shuffle seeded with `seed` (both splits come back in that shuffled order, like the
    arithmetic task). With `eval_path`, every usable row of that file is eval and `eval_size`
    is unused. Answers are returned as strings (numbers formatted without a spurious ".0").
    stats: {"rows": rows read in all files, malformed ones included, "malformed": rows skipped,
    "malformed_examples": the first few reasons, e.g. "data/x.jsonl line 3: not valid JSON"}.
    """
    malformed: list[str] = []
    problems, rows = _read_problems(path, "task.path", prompt_key, answer_key, malformed)
    if eval_path is None:
        if eval_size < 0:
            raise ConfigError(f"task.num_eval={eval_size!r} must be >= 0")
        if eval_size >= len(problems):
            raise ConfigError(
                f"task.num_eval={eval_size!r} leaves no training rows: {path} has {len(problems)} usable rows; "
                "lower task.num_eval or set task.eval_path to a separate eval file"
            )
        order = list(range(len(problems)))
        random.Random(seed).shuffle(order)
        train = [problems[i] for i in order[eval_size:]]
        eval_ = [problems[i] for i in order[:eval_size]]
    else:
        train = problems
        eval_, eval_rows = _read_problems(eval_path, "task.eval_path", prompt_key, answer_key, malformed)
        rows += eval_rows
    if malformed:
        log.warning("skipped %d malformed rows (first: %s)", len(malformed), malformed[0])
    stats = {"rows": rows, "malformed": len(malformed), "malformed_examples": malformed[:MAX_EXAMPLES]}
    return train, eval_, stats


def _read_problems(path: str, key: str, prompt_key: str, answer_key: str, malformed: list[str]) -> tuple[list[Problem], int]:
    """Usable problems of one file and its row count; appends a reason per skipped row to `malformed`."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}={path!r} is not a file; set {key} to a local .jsonl or .parquet file")
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{key}={path!r} has an unsupported suffix {suffix or '(none)'!r}; use a .jsonl or .parquet file")

    bad_before = len(malformed)
    with tempfile.TemporaryDirectory(prefix="tether-data-") as tmp:
        if suffix == ".jsonl":
            clean, row_names = _prescan_jsonl(file, Path(tmp) / "clean.jsonl", malformed)
            dataset = _load("json", clean, key, path, tmp) if row_names else None
        else:
            dataset = _load("parquet", file, key, path, tmp)
            row_names = [f"{path} row {i}" for i in range(len(dataset))]
    bad_lines = len(malformed) - bad_before  # JSONL lines that never reached `datasets`
    rows = bad_lines + (len(dataset) if dataset is not None else 0)
    if rows == 0:
        raise ConfigError(f"{key}={path!r} has no rows; point {key} at a non-empty file")

    if dataset is not None:
        for name, column in (("task.prompt_key", prompt_key), ("task.answer_key", answer_key)):
            if column not in dataset.column_names:
                raise ConfigError(
                    f"{name}={column!r} is not a column of {path} (columns: {', '.join(dataset.column_names)}); "
                    f"set {name} to one of them"
                )
    problems = []
    for row_name, question, answer in zip(row_names, *_columns(dataset, prompt_key, answer_key)):
        reason = _why_bad(question, prompt_key) or _why_bad(answer, answer_key)
        if reason:
            malformed.append(f"{row_name}: {reason}")
            continue
        problems.append(Problem(_as_text(question), _as_text(answer)))
    if not problems:
        raise ConfigError(
            f"{key}={path!r} has no usable rows: all {rows} are malformed (first: {malformed[bad_before]}); "
            f"check the file, task.prompt_key={prompt_key!r} and task.answer_key={answer_key!r}"
        )
    return problems, rows


def _columns(dataset, prompt_key: str, answer_key: str) -> tuple[list, list]:
    return ([], []) if dataset is None else (dataset[prompt_key], dataset[answer_key])


def _prescan_jsonl(file: Path, clean: Path, malformed: list[str]) -> tuple[Path, list[str]]:
    """Copy the lines that are JSON objects to `clean`; name each kept row by its line number."""
    row_names = []
    with open(file, "rb") as src, open(clean, "w", encoding="utf-8") as dst:
        for lineno, raw in enumerate(src, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                row = json.loads(raw.decode("utf-8").rstrip("\r\n"), parse_constant=_reject_constant)
            except (UnicodeDecodeError, ValueError) as e:
                malformed.append(f"{file} line {lineno}: not valid JSON ({str(e).splitlines()[0]})")
                continue
            if not isinstance(row, dict):
                malformed.append(f"{file} line {lineno}: not a JSON object (a {type(row).__name__})")
                continue
            dst.write(json.dumps(row) + "\n")
            row_names.append(f"{file} line {lineno}")
    return clean, row_names


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")  # json.loads accepts NaN/Infinity; Arrow's reader does not


def _load(builder: str, data_file: Path, key: str, path: str, cache_dir: str):
    """One split of a local file; the Arrow cache lives in `cache_dir`, so keep it in memory."""
    import datasets

    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a "Generating train split" bar per file is noise
    try:
        return datasets.load_dataset(builder, data_files=str(data_file), split="train",
                                     cache_dir=cache_dir, keep_in_memory=True)
    except Exception as e:  # Arrow/Parquet errors come in many types; all mean the same thing here
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise ConfigError(f"{key}={path!r} could not be read ({detail}); check the file") from None
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


def _why_bad(value, column: str) -> str | None:
    """Why `value` cannot be a question or answer, or None when it can."""
    if value is None:
        return f"{column} is missing or null"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"{column} is a {type(value).__name__}, not a string or number"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{column} is {value}"
    if isinstance(value, str) and not value.strip():
        return f"{column} is empty"
    return None


def _as_text(value: str | int | float) -> str:
    # Arrow widens a column of ints and floats to float64: 72 arrives as 72.0
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip() if isinstance(value, str) else str(value)

