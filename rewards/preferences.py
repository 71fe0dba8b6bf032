"""Preference pairs from a local JSONL or Parquet file, and the token ids a reward model scores.

A pair is a prompt with two responses to it, `chosen` (preferred) and `rejected`, as in TRL's
preference datasets, in one of two forms:

    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}                          # text
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],                          # messages
     "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}

A messages prompt is a conversation ending with a user turn; a messages response is one assistant
turn, because what a scorer reads from a rollout is (prompt, one model turn). The three fields of a
row are all text or all messages. The column names are settings (`prompt_key`, `chosen_key`,
`rejected_key`), like `task=jsonl`'s; `margin_key` optionally names a column of per-pair margins
(Llama 2's margin loss: how much better chosen is).

Reading follows rewards/datasets.py `load_problems`, whose helpers it shares: local files only,
through `datasets`, JSONL lines pre-scanned so that a broken line is one malformed row; a row
whose field is missing, null, empty, neither text nor a well-formed messages list, mixes the two
forms, or whose chosen equals its rejected response is skipped and counted, with the first few
reasons in the stats. The file itself being unusable (missing, wrong suffix, a key that is not a
column, no usable row) raises `ConfigError` naming the setting. The eval split is a seeded
shuffle, or a separate eval file.

`render_pair` gives the ids a reward model scores, rendered as tether's rollouts reach a scorer:
the prompt exactly as the task renders it (rewards/tasks.py `render_prompt`), then the response
tokens and the EOS token a rollout that stopped ends with. A reward model trained on other
renderings (another template, no EOS) would be scored at test time on inputs it never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from rewards.datasets import hold_out, malformed_stats, no_usable_rows, read_columns
from rewards.tasks import Task, render_prompt

Turns = str | list[dict]  # text, or chat messages: [{"role": ..., "content": ...}, ...]
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PreferencePair:
    """One prompt and two responses to it, `chosen` preferred to `rejected`: all three text, or all
    three messages (the prompt ending with a user turn, each response one assistant turn). `margin`:
    the pair's margin when the file has a margin column, else None."""

    prompt: Turns
    chosen: Turns
    rejected: Turns
    margin: float | None = None


def load_preferences(
    path: str,
    *,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    margin_key: str | None = None,
    eval_path: str | None = None,
    eval_size: int,
    seed: int,
    config_key: str = "preferences",
) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
    """(train, eval, stats) from `path`, and from `eval_path` when given.

    Without `eval_path`, `eval_size` usable pairs are held out as eval by a shuffle seeded with
    `seed` (both splits in that shuffled order); with it, every usable pair of that file is eval
    and `eval_size` is unused. stats: {"rows": rows read in all files, malformed ones included,
    "malformed": rows skipped, "malformed_examples": the first few reasons}.
    With `margin_key`, each pair's `margin` is that column's value (a missing or non-numeric one
    makes the row malformed). Errors name the settings `{config_key}.path`, `.eval_path`,
    `.num_eval`, `.prompt_key`, `.chosen_key`, `.rejected_key` and `.margin_key`, so a caller whose
    settings live elsewhere passes its own prefix.
    """
    columns = {f"{config_key}.prompt_key": prompt_key, f"{config_key}.chosen_key": chosen_key,
               f"{config_key}.rejected_key": rejected_key}
    if margin_key is not None:
        columns[f"{config_key}.margin_key"] = margin_key
    malformed: list[str] = []
    pairs, rows = _read_pairs(path, f"{config_key}.path", columns, malformed)
    if eval_path is None:
        train, eval_ = hold_out(pairs, eval_size, seed, path, f"{config_key}.num_eval", f"{config_key}.eval_path")
    else:
        train = pairs
        eval_, eval_rows = _read_pairs(eval_path, f"{config_key}.eval_path", columns, malformed)
        rows += eval_rows
    return train, eval_, malformed_stats(rows, malformed)


def _read_pairs(path: str, key: str, columns: dict[str, str], malformed: list[str]) -> tuple[list[PreferencePair], int]:
    """Usable pairs of one file and its row count; appends a reason per skipped row to `malformed`."""
    bad_before = len(malformed)
    # exact: a file mixing text and messages rows would otherwise come back with "42" read as 42
    row_names, values, rows = read_columns(path, key, columns, malformed, exact=True)
    prompt_key, chosen_key, rejected_key, *margin_key = columns.values()
    margins = values[margin_key[0]] if margin_key else [None] * len(row_names)
    pairs = []
    for row_name, prompt, chosen, rejected, margin in zip(row_names, values[prompt_key], values[chosen_key],
                                                           values[rejected_key], margins):
        pair, reason = _parse_pair(prompt, chosen, rejected, prompt_key, chosen_key, rejected_key)
        if not reason and margin_key:
            reason = _why_bad_margin(margin, margin_key[0])
        if reason:
            malformed.append(f"{row_name}: {reason}")
            continue
        pairs.append(replace(pair, margin=float(margin)) if margin_key else pair)
    if not pairs:
        raise no_usable_rows(key, path, rows, malformed[bad_before], columns)
    return pairs, rows


def _parse_pair(prompt, chosen, rejected, prompt_key: str, chosen_key: str,
                rejected_key: str) -> tuple[PreferencePair | None, str | None]:
    """(the pair, None), or (None, why the row is malformed)."""
    fields = ((prompt, prompt_key, "user"), (chosen, chosen_key, "assistant"), (rejected, rejected_key, "assistant"))
    for value, column, last_role in fields:
        reason = _why_bad(value, column, last_role)
        if reason:
            return None, reason
    kinds = {column: "text" if isinstance(value, str) else "messages" for value, column, _ in fields}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{column} is {kind}" for column, kind in kinds.items())
        return None, f"{described}; give all three as text or all three as messages"
    if isinstance(prompt, str):
        pair = PreferencePair(prompt.strip(), chosen, rejected)
    else:  # only role and content reach the template (Parquet adds None for keys other rows have)
        pair = PreferencePair(*([{"role": m["role"], "content": m["content"]} for m in messages]
                                for messages in (prompt, chosen, rejected)))
    if _response_text(pair.chosen).strip() == _response_text(pair.rejected).strip():
        return None, f"{chosen_key} and {rejected_key} are the same response"
    return pair, None


def _why_bad(value, column: str, last_role: str) -> str | None:
    """Why `value` cannot be this field, or None when it can. `last_role`: the role its (last) message
    must have: user for a prompt, assistant for a response (which must be that one message)."""
    if value is None:
        return f"{column} is missing or null"
    if isinstance(value, str):
        return f"{column} is empty" if not value.strip() else None
    if not isinstance(value, list):
        return f"{column} is of type {type(value).__name__}, not text or a messages list"
    if not value:
        return f"{column} is empty"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"{column} message {i} is of type {type(message).__name__}, not a {{role, content}} object"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"{column} message {i} has role {role!r}, not one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"{column} message {i} has content of type {type(content).__name__}, not text"
    if value[-1]["role"] != last_role:
        return f"{column}'s last turn has role {value[-1]['role']!r}, not {last_role!r}"
    if not value[-1]["content"].strip():
        return f"{column} has an empty last turn"
    if last_role == "assistant" and len(value) != 1:
        return f"{column} has {len(value)} messages; a response is one assistant turn"
    return None


def _why_bad_margin(value, column: str) -> str | None:
    if value is None:
        return f"{column} is missing or null"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{column} is of type {type(value).__name__}, not a number"
    return None if math.isfinite(value) else f"{column} is {value}"


def _response_text(response: Turns) -> str:
    return response if isinstance(response, str) else response[0]["content"]


# ---- rendering ----------------------------------------------------------------------------

def prompt_ids(prompt: Turns, tokenizer, system_prompt: str | None = None, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt as a rollout's prompt: text through rewards/tasks.py `render_prompt` (the
    chat template with add_generation_prompt=True when the tokenizer has one and `chat_template`, else
    plain text ending with a newline); messages through the template likewise, `system_prompt` first
    unless they open with a system turn. Without a template, messages become their contents joined
    by blank lines plus a newline, which for (system, user) is what `render_prompt` writes."""
    if isinstance(prompt, str):
        # render_prompt reads only the task's system prompt and chat_template switch
        task = Task(train=[], eval=[], reward_fn=None, system_prompt=system_prompt, chat_template=chat_template)
        return render_prompt(task, tokenizer, prompt)
    messages = list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if chat_template and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n\n".join(m["content"] for m in messages) + "\n")["input_ids"]


def response_ids(response: Turns, tokenizer) -> list[int]:
    """Token ids of a response as a rollout that stopped ends: its text tokenized without special
    tokens, then the tokenizer's EOS (not added twice when the text already ends with it).

    A rollout's response ids are the engine's own tokens; text re-tokenized can split differently,
    and a response cut at rollout.max_new_tokens ends without EOS. Both are small next to what a
    reward model learns from; a file of text has nothing better to offer."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token (tokenizer.eos_token_id is None); a reward model scores "
                         "responses ending with the EOS a rollout stops on: use a tokenizer that defines one")
    ids = tokenizer(_response_text(response), add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == eos else [*ids, eos]


def render_pair(pair: PreferencePair, tokenizer, system_prompt: str | None = None,
                chat_template: bool = True) -> tuple[list[int], list[int]]:
    """(chosen_ids, rejected_ids): the prompt's ids (`prompt_ids`, shared by both) followed by each
    response's ids (`response_ids`). `system_prompt` and `chat_template` are the task's
    (task.system_prompt, task.chat_template), so that pairs are rendered like that task's rollouts."""
    prompt = prompt_ids(pair.prompt, tokenizer, system_prompt, chat_template)
    return prompt + response_ids(pair.chosen, tokenizer), prompt + response_ids(pair.rejected, tokenizer)
