"""Exact-match accuracy on math word problems, by batched KV-cache generation.

Each problem's prompt is rendered with the tokenizer's chat template as one user message (when
the tokenizer has one; otherwise the raw prompt is encoded with the tokenizer's special tokens),
the model generates up to ``max_new_tokens`` tokens (stopping at its EOS ids and the
tokenizer's EOS), and the answer is parsed from the decoded text by
:func:`distill_jax.data.mathgen.parse_answer`: the number after ``####``, else the one in the
last ``\\boxed{}``, else the last number ("1,234", "$5", "-3", "2.50", "3/4" understood). It is
right when it equals the reference answer numerically (the ``answer`` field of the problem, or
the answer parsed from its ``response``).

With ``num_samples > 1`` each problem is sampled that many times at ``temperature`` and the
most frequent parsed answer wins (:func:`majority_vote`); with one sample decoding is greedy.
All prompts are left-padded to one length, so one compilation serves every batch.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax

from distill_jax.data.mathgen import parse_answer
from distill_jax.metrics import progress as progress_lines
from distill_jax.models import Model
from distill_jax.models.generate import generate

Number = int | float


@dataclasses.dataclass(frozen=True)
class MathResult:
    """One problem's outcome: the reference answer, the voted answer (None: no number in any
    sample), whether it is right, every sample's parsed answer, and the first sample's text."""

    reference: Number
    answer: Number | None
    correct: bool
    samples: tuple[Number | None, ...]
    output: str


@dataclasses.dataclass(frozen=True)
class MathEval:
    """Exact-match accuracy over ``results``, with the generated tokens and the wall time."""

    results: tuple[MathResult, ...]
    num_samples: int
    generated_tokens: int
    wall_s: float

    @property
    def correct(self) -> int:
        return sum(r.correct for r in self.results)

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self, predictions: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "accuracy": self.accuracy, "correct": self.correct, "total": self.total,
            "num_samples": self.num_samples, "generated_tokens": self.generated_tokens,
            "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s}
        if predictions:
            out["predictions"] = [dataclasses.asdict(r) for r in self.results]
        return out


def answers_equal(a: Number | None, b: Number | None) -> bool:
    """Numeric equality of two parsed answers (None never equals anything)."""
    if a is None or b is None:
        return False
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)


def majority_vote(answers: Sequence[Number | None]) -> Number | None:
    """The most frequent answer (numerically: 12 and 12.0 are one answer), ignoring None; ties
    go to the answer that appeared first. None when no answer has a number."""
    counts: collections.Counter = collections.Counter()
    first: dict[float, Number] = {}
    for a in answers:
        if a is None:
            continue
        key = float(a)
        counts[key] += 1
        first.setdefault(key, a)
    if not counts:
        return None
    best = max(counts.values())
    return next(first[k] for k in first if counts[k] == best)


def load_problems(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` (all when None) problems of a JSONL file of ``prompt`` records with
    an ``answer`` or a ``response`` ending ``#### <answer>`` (``distill-jax mathgen`` writes
    them), as dicts with ``prompt`` and ``answer``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"math test file {path} not found; write one with "
                                f"`distill-jax mathgen --split test --n 200 --out {path}`")
    problems = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(problems) >= limit:
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
        problems.append(_problem(row, f"{path}:{line_no}"))
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def _problem(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping) or not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: a math problem needs a string 'prompt' field")
    answer = row.get("answer")
    if isinstance(answer, str):
        answer = parse_answer(answer)
    if answer is None and isinstance(row.get("response"), str):
        answer = parse_answer(row["response"])
    if answer is None or isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise ValueError(f"{where}: no reference answer: give a numeric 'answer' field or a "
                         "'response' that ends with '#### <answer>'")
    return {"prompt": row["prompt"], "answer": answer}


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat_template: bool | None = None
                   ) -> list[list[int]]:
    """Token ids of each prompt: one user message in the tokenizer's chat template with the
    generation prompt (``chat_template`` None: when the tokenizer has a template), else the raw
    prompt with the tokenizer's special tokens."""
    use_chat = (getattr(tokenizer, "chat_template", None) is not None if chat_template is None
                else chat_template)
    out = []
    for prompt in prompts:
        if use_chat:
            enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, tokenize=True)
            if hasattr(enc, "keys"):  # transformers may return a BatchEncoding
                enc = enc["input_ids"]
        else:
            enc = tokenizer(prompt)["input_ids"]
        out.append([int(t) for t in enc])
    return out


def math_accuracy(model: Model, tokenizer: Any, problems: Sequence[Mapping[str, Any]], *,
                  max_new_tokens: int = 256, num_samples: int = 1, temperature: float = 0.7,
                  batch_size: int = 8, chat_template: bool | None = None, seed: int = 0,
                  progress: bool = False) -> MathEval:
    """Exact-match accuracy of ``model`` on ``problems`` (dicts with ``prompt`` and ``answer``,
    or ``prompt`` and a ``response`` ending ``#### <answer>``); see the module docstring.

    ``batch_size`` is the number of sequences generated together (a problem's samples are
    separate sequences); ``seed`` makes sampling reproducible; ``progress`` shows progress on
    stderr (a bar on a terminal, plain lines otherwise).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples > 1 and not temperature > 0:
        raise ValueError(f"majority voting over {num_samples} samples needs temperature > 0 "
                         f"(got {temperature}); or set num_samples=1 for greedy decoding")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    problems = [_problem(p, f"problem {i}") for i, p in enumerate(problems)]
    if not problems:
        raise ValueError("no math problems given")
    ids = encode_prompts(tokenizer, [p["prompt"] for p in problems], chat_template)
    eos = set(model.config.eos_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    # One padded prompt length (a multiple of 64) for every batch: one compilation.
    bucket = -(-max(len(r) for r in ids) // 64) * 64
    rows = [(i, r) for i, r in enumerate(ids) for _ in range(num_samples)]
    texts: list[list[str]] = [[] for _ in problems]
    generated = 0
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    for b, start in enumerate(progress_lines(range(0, len(rows), batch_size), "math",
                                             enabled=progress)):
        chunk = rows[start:start + batch_size]
        prompts = [r for _, r in chunk] + [chunk[0][1]] * (batch_size - len(chunk))
        out = generate(model, prompts, max_new_tokens=max_new_tokens,
                       temperature=temperature if num_samples > 1 else 0.0, eos_ids=tuple(eos),
                       pad_id=pad_id, seed=jax.random.fold_in(key, b), prompt_bucket=bucket)
        for (i, _), seq in zip(chunk, out.sequences):
            texts[i].append(tokenizer.decode(seq, skip_special_tokens=True))
            generated += len(seq)
    wall = time.perf_counter() - t0
    results = []
    for p, outs in zip(problems, texts):
        samples = tuple(parse_answer(t) for t in outs)
        answer = majority_vote(samples)
        results.append(MathResult(reference=p["answer"], answer=answer,
                                  correct=answers_equal(answer, p["answer"]), samples=samples,
                                  output=outs[0]))
    return MathEval(tuple(results), num_samples, generated, wall)


__all__ = ["MathEval", "MathResult", "answers_equal", "encode_prompts", "load_problems",
           "majority_vote", "math_accuracy"]
