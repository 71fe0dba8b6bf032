"""Math answer reward: 1.0 when the response's final answer equals the reference, by math-verify.

Equivalence is mathematical, not textual: "\\boxed{0.5}" matches "1/2", "$\\frac{3}{4}$"
matches "0.75", "The answer is 1,234." matches "1234". A GSM8K-style reference ("<reasoning>
#### 72") is reduced to what follows the last "####".

Extraction settings (math-verify 0.9), chosen for short chat-model answers:
- `LatexExtractionConfig(boxed_match_priority=0)`: a \\boxed{...} answer wins over everything
  else in the response (math-verify's default lets "the answer is" phrases win over it).
- `ExprExtractionConfig()`: plain numbers and expressions without LaTeX ("12", "3/4", "-3.").
- both with `try_extract_without_anchor=True` (the default): with no \\boxed{} and no "answer
  is"/"Answer:" anchor, the LAST number wins ("5 + 3 = 8" -> 8; "The answer is 12." -> 12,
  the sentence's full stop is not a decimal point). Text with no number ("five", "hello")
  extracts nothing and scores 0.0; so does an empty response.
- units and percent are normalised ("50%" equals 0.5, "3 hours" is 3); numbers compare at
  6 decimal places (`float_rounding=6`): "0.333333" equals 1/3, "0.33" does not.

math-verify bounds parsing and comparison with SIGALRM, which works only in the main thread.
Elsewhere (a Ray async actor runs its event loop in a thread) it runs without a timeout, so
`_is_cheap` rejects, before comparing, answers whose exact value sympy would take minutes or
memory to build ("10^{10^{10}}", "(10^9)!"): they score 0.0 in every thread, so the reward
does not depend on where it is computed.
"""

from __future__ import annotations

import functools
import logging
import math
import threading

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

log = logging.getLogger(__name__)

EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
TIMEOUT_S = 5  # per parse and per comparison; main thread only (see the module docstring)
MAX_DIGITS = 10_000  # answers that may need larger numbers score 0.0 ("2^{1000}" passes, "10^{10^{10}}" does not)
COMBINATORIAL = (sympy.factorial, sympy.factorial2, sympy.binomial, sympy.gamma, sympy.subfactorial,
                 sympy.RisingFactorial, sympy.FallingFactorial)
UNEVALUATED = (sympy.Sum, sympy.Product, sympy.Integral, sympy.Limit, sympy.Derivative)  # not final answers


def math_reward(response: str, answer: str) -> float:
    """1.0 if the final answer in `response` is mathematically equal to `answer`, else 0.0; never raises."""
    try:
        gold = _parse_reference(answer)
        if not gold:
            return 0.0
        pred = parse(response, extraction_config=EXTRACTION, parsing_timeout=_timeout())
        pred = [p for p in pred if _is_cheap(p)]
        return 1.0 if pred and verify(list(gold), pred, timeout_seconds=_timeout()) else 0.0  # a tuple would be one gold
    except Exception:  # math-verify swallows its own errors; this guards the glue around it
        log.debug("math_reward failed on %.200r vs %.200r", response, answer, exc_info=True)
        return 0.0


def reference_answer(answer: str) -> str:
    """The part of a GSM8K-style reference after its last "####", else the whole reference, stripped."""
    return answer.rsplit("####", 1)[-1].strip()


@functools.lru_cache(maxsize=4096)  # one reference is scored against every sample of its group
def _parse_reference(answer: str) -> tuple:
    gold = parse(reference_answer(answer), extraction_config=EXTRACTION, parsing_timeout=_timeout())
    if not gold:
        log.warning("reference answer %r has no parsable final answer; every response to it scores 0.0", answer[-80:])
    return tuple(gold)


def _timeout() -> int | None:
    # signal.alarm only works in the main thread; math-verify raises anywhere else
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _is_cheap(value) -> bool:
    """False for answers whose exact value sympy could take minutes or gigabytes to build."""
    if isinstance(value, str):
        return True
    try:
        roots = list(value) if isinstance(value, sympy.MatrixBase) else [value]
        return all(not root.has(*UNEVALUATED) and _digits(root) <= MAX_DIGITS for root in roots)
    except Exception:
        return False


def _digits(expr) -> float:
    """An upper bound on the decimal digits of any number built while evaluating `expr` exactly."""
    if not isinstance(expr, sympy.Basic) or not expr.args:
        if isinstance(expr, (sympy.Integer, sympy.Rational)):
            return max(abs(expr.p), abs(expr.q)).bit_length() * 0.302 + 1
        if isinstance(expr, sympy.Float):
            return len(str(expr))  # parsed from a decimal in the text, so as long as it was written
        return 1  # symbols, pi, E, I, strings
    if isinstance(expr, sympy.Pow):
        base = _digits(expr.base)
        if expr.exp.free_symbols:
            return base  # a symbolic power is never expanded into digits
        if _digits(expr.exp) > 7:
            return math.inf
        return base * max(1.0, abs(float(expr.exp)))  # safe: the exponent has <= 7 digits
    if isinstance(expr, COMBINATORIAL):
        n = max(_digits(a) for a in expr.args)
        return n * 10**n if n <= 7 else math.inf  # n! has about n*log10(n) digits
    parts = [_digits(a) for a in expr.args]
    return sum(parts) if isinstance(expr, sympy.Mul) else max(parts) + 1
