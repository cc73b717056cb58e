"""Evaluation: bits per byte / perplexity on text (more in later modules)."""

from distill_jax.eval.lm import LMEval, evaluate_text

__all__ = ["LMEval", "evaluate_text"]
