"""Verifiers: does a teacher completion reach the reference answer?

A verifier is named by a spec string (the ``verifier`` key of a traces config):

* ``math`` (default): the completion's final answer equals the reference numerically and
  exactly. The final answer is read by :func:`distill_jax.data.mathgen.answer_value` (the
  number after ``####``, else the last ``\\boxed{...}``, else the last number; commas, signs,
  decimals with trailing zeros and fractions like ``3/4`` or ``\\frac{3}{4}`` normalised), so
  ``"#### 1,200.0"`` matches ``1200`` and ``\\boxed{\\frac{1}{2}}`` matches ``0.5``. The reference
  is a number, or a text read the same way (e.g. a worked solution ending ``#### 72``).
* ``exact``: the completion, stripped of surrounding whitespace, equals the reference string
  (stripped) character for character.
* ``module:function``: a user's Python callable ``function(completion, reference) -> bool``
  imported from ``module`` (which must be importable, e.g. on ``PYTHONPATH``).

:func:`make_verifier` turns a spec into a :class:`Verifier`; a bad spec raises one
``ValueError`` line naming the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import decimal
import importlib
import numbers
from fractions import Fraction
from typing import Any, Callable

from distill_jax.data.mathgen import answer_value

MATH, EXACT = "math", "exact"
BUILTIN = (MATH, EXACT)


def reference_value(reference: Any) -> Fraction | None:
    """The exact numeric value of a reference answer: an integer or fraction as is, a float
    or decimal as the nearest fraction of denominator at most 10**12, a text by
    :func:`~distill_jax.data.mathgen.answer_value`; None when there is none."""
    if isinstance(reference, bool):
        return None
    if isinstance(reference, numbers.Rational):
        return Fraction(reference)
    if isinstance(reference, (float, decimal.Decimal)):
        return Fraction(reference).limit_denominator(10 ** 12)
    if isinstance(reference, str):
        return answer_value(reference)
    return None


def math_answer(completion: str) -> str | None:
    """The final answer of ``completion`` as a canonical string (``"3/4"``, ``"-12"``), or None."""
    value = answer_value(completion)
    return None if value is None else str(value)


def math_verify(completion: str, reference: Any) -> bool:
    """Whether ``completion``'s final answer equals ``reference`` exactly (see the module)."""
    want = reference_value(reference)
    got = answer_value(completion)
    return want is not None and got is not None and got == want


def exact_verify(completion: str, reference: Any) -> bool:
    """Whether ``completion`` equals ``str(reference)``, both stripped of surrounding whitespace."""
    return reference is not None and completion.strip() == str(reference).strip()


def exact_answer(completion: str) -> str:
    return completion.strip()


@dataclasses.dataclass(frozen=True)
class Verifier:
    """A named verdict function ``check(completion, reference) -> bool`` and ``answer``, the
    completion's answer as a string (what majority-consistent selection votes on)."""

    spec: str
    check: Callable[[str, Any], bool]
    answer: Callable[[str], str | None]

    def __call__(self, completion: str, reference: Any) -> bool:
        return bool(self.check(completion, reference))


def make_verifier(spec: str) -> Verifier:
    """The verifier a spec names: ``math``, ``exact`` or ``module:function``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"verifier {spec!r} is empty; use 'math', 'exact' or "
                         "'module:function' (a Python callable (completion, reference) -> bool)")
    spec = spec.strip()
    if spec == MATH:
        return Verifier(spec, math_verify, math_answer)
    if spec == EXACT:
        return Verifier(spec, exact_verify, exact_answer)
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"verifier {spec!r} is not 'math', 'exact' or 'module:function'; name "
                         "a Python callable (completion, reference) -> bool, e.g. "
                         "'my_checks:is_correct'")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"verifier {spec!r}: cannot import module {module_name!r} ({e}); put "
                         "it on PYTHONPATH or name an installed module") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"verifier {spec!r}: module {module_name!r} has no attribute "
                         f"{attr!r}; check the function name")
    if not callable(fn):
        raise ValueError(f"verifier {spec!r}: {module_name}.{attr} is a "
                         f"{type(fn).__name__}, not a function (completion, reference) -> bool")
    return Verifier(spec, fn, exact_answer)


__all__ = ["BUILTIN", "EXACT", "MATH", "Verifier", "exact_verify", "make_verifier",
           "math_answer", "math_verify", "reference_value"]
