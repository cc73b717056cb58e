"""Verifiers: final-answer extraction by hand and by property, exact match, user callables."""

from __future__ import annotations

import random
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from distill_jax.data.mathgen import answer_value, parse_answer
from distill_jax.traces.verify import make_verifier, math_verify, reference_value


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7.\n#### 42", Fraction(42)),
    ("#### 1,200.0", Fraction(1200)),
    ("#### +5", Fraction(5)),
    ("#### -3/4", Fraction(-3, 4)),
    ("The answer is \\boxed{\\frac{3}{4}}.", Fraction(3, 4)),
    ("so \\boxed{-\\dfrac{1}{2}}", Fraction(-1, 2)),
    ("\\boxed{\\$1,234.50} in total", Fraction(246900, 200)),
    ("first \\boxed{3} then \\boxed{ 12 }", Fraction(12)),
    ("\\boxed{50\\%}", Fraction(50)),
    ("\\boxed{x + 1}", None),  # a boxed non-number is no number, not the last number
    ("\\boxed{\\frac{1}{0}}", None),
    ("She pays $1,250 in total.", Fraction(1250)),
    ("It is 3/4 of the cake", Fraction(3, 4)),
    ("48 / 2 = 24", Fraction(24)),  # a worked step, not a fraction
    ("The result is 12.50", Fraction(25, 2)),
    ("no digits here", None),
    ("", None),
])
def test_answer_extraction(text, expected):
    assert answer_value(text) == expected


def test_parse_answer_keeps_its_types():
    assert parse_answer("#### 8/4") == 2 and type(parse_answer("#### 8/4")) is int
    assert parse_answer("\\boxed{0.50}") == 0.5


def _spellings(value: Fraction, rng: random.Random) -> list[str]:
    """Ways a final answer of ``value`` is written."""
    out = []
    if value.denominator == 1:
        n = int(value)
        out += [f"{n}", f"{n:,}", f"{n}.00", f"{n:,}.0"]
        if n >= 0:
            out += [f"+{n}", f"${n:,}"]
    else:
        sign = "-" if value < 0 else ""
        a, b = abs(value.numerator), value.denominator
        out += [f"{sign}{a}/{b}", f"{sign}\\frac{{{a}}}{{{b}}}", f"\\frac{{{sign}{a}}}{{{b}}}"]
        if 10 ** 6 % b == 0:  # a finite decimal: also with trailing zeros
            out.append(f"{float(value):.6f}")
    return out


@settings(max_examples=200, deadline=None)
@given(num=st.integers(-10 ** 7, 10 ** 7), den=st.sampled_from([1, 1, 2, 3, 4, 5, 8, 16, 7]),
       seed=st.integers(0, 2 ** 16))
def test_any_spelling_of_a_number_verifies(num, den, seed):
    value = Fraction(num, den)
    rng = random.Random(seed)
    for s in _spellings(value, rng):
        for text in (f"Some steps: 2 * 3 = 6.\n#### {s}", f"So the answer is \\boxed{{{s}}}.",
                     f"3 + 4 = 7, and the total is {s}"):
            if text.startswith("So") and s.startswith("$"):
                continue
            assert answer_value(text) == value, text
            assert math_verify(text, value if den > 1 else int(value)), text
            assert not math_verify(text, value + 1), text
        assert math_verify(f"#### {s}", f"worked solution\n#### {s}")


def test_reference_values():
    assert reference_value(3) == 3 and reference_value(0.5) == Fraction(1, 2)
    assert reference_value("x\n#### 72") == 72 and reference_value(True) is None
    assert reference_value(None) is None


def test_exact_verifier():
    v = make_verifier("exact")
    assert v("  Paris\n", "Paris") and not v("paris", "Paris") and not v("Paris!", "Paris")
    assert v.answer(" Paris ") == "Paris"


def test_user_callable_verifier(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        "def is_yes(completion, reference):\n    return completion.lower().startswith('yes')\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    v = make_verifier("my_checks:is_yes")
    assert v("Yes, it is", None) and not v("no", None)
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        make_verifier("my_checks:nope")
    with pytest.raises(ValueError, match="not a function"):
        make_verifier("my_checks:NOT_CALLABLE")
    sys.modules.pop("my_checks", None)


@pytest.mark.parametrize("spec, message", [
    ("", "is empty"),
    ("maths", "is not 'math', 'exact' or 'module:function'"),
    ("a:b:c", "is not 'math', 'exact' or 'module:function'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
])
def test_bad_verifier_specs_fail_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        make_verifier(spec)
    assert "\n" not in str(e.value)


def test_cli_reports_a_bad_verifier_in_one_line(capsys):
    from distill_jax import cli
    from tests.conftest import REPO
    code = cli.main(["traces", str(REPO / "configs" / "traces_tiny.yaml"), "verifier=mathh"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("distill-jax traces: error: verifier 'mathh' is not") and "\n" not in err
