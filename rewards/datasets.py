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

The file handling is shared with other row-wise loaders (rewards/preferences.py): `read_columns`
(one file's rows, malformed JSONL lines counted), `hold_out` (the seeded eval split),
`no_usable_rows` and `malformed_stats` (the error and the stats every loader reports alike). They
take the names of the settings to report, so each loader's errors name its own keys.
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
        train, eval_ = hold_out(problems, eval_size, seed, path, "task.num_eval", "task.eval_path")
    else:
        train = problems
        eval_, eval_rows = _read_problems(eval_path, "task.eval_path", prompt_key, answer_key, malformed)
        rows += eval_rows
    return train, eval_, malformed_stats(rows, malformed)


def hold_out(items: list, eval_size: int, seed: int, path: str, size_key: str, eval_path_key: str) -> tuple[list, list]:
    """(train, eval): `eval_size` of `items` held out by a shuffle seeded with `seed`, both splits in
    that shuffled order. `size_key` and `eval_path_key` name the settings an error points at."""
    if eval_size < 0:
        raise ConfigError(f"{size_key}={eval_size!r} must be >= 0")
    if eval_size >= len(items):
        raise ConfigError(
            f"{size_key}={eval_size!r} leaves no training rows: {path} has {len(items)} usable rows; "
            f"lower {size_key} or set {eval_path_key} to a separate eval file"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[eval_size:]], [items[i] for i in order[:eval_size]]


def malformed_stats(rows: int, malformed: list[str]) -> dict:
    """The stats a loader returns (and a warning when rows were skipped): {"rows": rows read, malformed
    ones included, "malformed": rows skipped, "malformed_examples": the first few reasons}."""
    if malformed:
        log.warning("skipped %d malformed rows (first: %s)", len(malformed), malformed[0])
    return {"rows": rows, "malformed": len(malformed), "malformed_examples": malformed[:MAX_EXAMPLES]}


def no_usable_rows(key: str, path: str, rows: int, first: str, columns: dict[str, str]) -> ConfigError:
    """The error for a file whose rows are all malformed; `columns` maps each column setting to its value."""
    named = [f"{setting}={column!r}" for setting, column in columns.items()]
    keys = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return ConfigError(f"{key}={path!r} has no usable rows: all {rows} are malformed (first: {first}); "
                       f"check the file, {keys}")


def _read_problems(path: str, key: str, prompt_key: str, answer_key: str, malformed: list[str]) -> tuple[list[Problem], int]:
    """Usable problems of one file and its row count; appends a reason per skipped row to `malformed`."""
    columns = {"task.prompt_key": prompt_key, "task.answer_key": answer_key}
    bad_before = len(malformed)
    row_names, values, rows = read_columns(path, key, columns, malformed)
    problems = []
    for row_name, question, answer in zip(row_names, values[prompt_key], values[answer_key]):
        reason = _why_bad(question, prompt_key) or _why_bad(answer, answer_key)
        if reason:
            malformed.append(f"{row_name}: {reason}")
            continue
        problems.append(Problem(_as_text(question), _as_text(answer)))
    if not problems:
        raise no_usable_rows(key, path, rows, malformed[bad_before], columns)
    return problems, rows


def read_columns(path: str, key: str, columns: dict[str, str], malformed: list[str], *,
                 exact: bool = False) -> tuple[list[str], dict[str, list], int]:
    """(row names, {column: its values}, rows) of one local .jsonl/.parquet file, read through `datasets`.

    `key` is the setting holding `path` (e.g. "task.path"); `columns` maps each column setting to the
    column it names (e.g. {"task.prompt_key": "question"}). JSONL lines that are not JSON objects are
    skipped, counted in `rows` and given a reason in `malformed`; the values of the other rows come
    back unchecked, one per row name ("FILE line N" or "FILE row N"), for the caller to validate.
    Raises ConfigError for a missing file, a wrong suffix, an unreadable or empty file, or a column
    setting that names no column.

    exact: a JSONL column's values come back exactly as JSON wrote them. Arrow gives a column one
    type; when the rows disagree (text in some, lists in others) `datasets` re-reads the column
    as JSON, which turns the text "007" into the number 7 and "null" into None, and Arrow fills a
    struct's keys missing from one row with None. With `exact`, the pre-scan hands the named
    columns to `datasets` as JSON text (one Arrow type whatever the rows hold) and they are decoded
    here. Parquet columns are typed in the file, so they come back as Arrow reads them.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}={path!r} is not a file; set {key} to a local .jsonl or .parquet file")
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{key}={path!r} has an unsupported suffix {suffix or '(none)'!r}; use a .jsonl or .parquet file")

    bad_before = len(malformed)
    with tempfile.TemporaryDirectory(prefix="tether-data-") as tmp:
        if suffix == ".jsonl":
            encoded = tuple(dict.fromkeys(columns.values())) if exact else ()
            clean, row_names = _prescan_jsonl(file, Path(tmp) / "clean.jsonl", malformed, encoded)
            dataset = _load("json", clean, key, path, tmp) if row_names else None
        else:
            dataset = _load("parquet", file, key, path, tmp)
            row_names = [f"{path} row {i}" for i in range(len(dataset))]
    bad_lines = len(malformed) - bad_before  # JSONL lines that never reached `datasets`
    rows = bad_lines + (len(dataset) if dataset is not None else 0)
    if rows == 0:
        raise ConfigError(f"{key}={path!r} has no rows; point {key} at a non-empty file")

    if dataset is None:
        return row_names, {column: [] for column in columns.values()}, rows
    for setting, column in columns.items():
        if column not in dataset.column_names:
            raise ConfigError(
                f"{setting}={column!r} is not a column of {path} (columns: {', '.join(dataset.column_names)}); "
                f"set {setting} to one of them"
            )
    values = {column: dataset[column] for column in columns.values()}
    if exact and suffix == ".jsonl":
        values = {column: [None if v is None else json.loads(v) for v in vs] for column, vs in values.items()}
    return row_names, values, rows


def _prescan_jsonl(file: Path, clean: Path, malformed: list[str], encoded: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    """Copy the lines that are JSON objects to `clean`, the fields named in `encoded` as JSON text;
    name each kept row by its line number."""
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
            for column in encoded:
                if column in row:  # a missing field stays missing: None either way
                    row[column] = json.dumps(row[column])
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

