"""Evaluation: held-out bits per byte and perplexity, teacher/student agreement, math exact match.

``run_eval(cfg)`` evaluates a run's teacher and student as its config's ``eval`` section says
(what ``distill-jax eval`` runs); the pieces work alone on any model and tokenizer:
``evaluate_text`` / ``evaluate_docs``, ``agreement`` / ``agreement_docs`` and ``math_accuracy``.
"""

from distill_jax.eval.agreement import Agreement, agreement, agreement_docs
from distill_jax.eval.lm import LMEval, ScoredDoc, evaluate_docs, evaluate_text, scored_doc, text_docs
from distill_jax.eval.math_eval import (MathEval, MathResult, answers_equal, load_problems,
                                        majority_vote, math_accuracy)
from distill_jax.eval.run import format_table, result_path, run_eval

__all__ = [
    "Agreement", "LMEval", "MathEval", "MathResult", "ScoredDoc", "agreement", "agreement_docs",
    "answers_equal", "evaluate_docs", "evaluate_text", "format_table", "load_problems",
    "majority_vote", "math_accuracy", "result_path", "run_eval", "scored_doc", "text_docs",
]
