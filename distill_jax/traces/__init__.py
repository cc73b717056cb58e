"""Reasoning-trace distillation: teacher samples verified by rejection, and selection policies
(training on pair records with the ``redi`` term: ``data.record: pairs``,
:mod:`distill_jax.data.pairs`).

* :mod:`distill_jax.traces.verify`: verifiers (``math``, ``exact``, ``module:function``);
* :mod:`distill_jax.traces.run`: ``distill-jax traces CONFIG`` (sample, score, verify, write);
* :mod:`distill_jax.traces.store`: the kill-safe, exactly-once output directory;
* :mod:`distill_jax.traces.selection`: selection policies -> chat records;
* :mod:`distill_jax.traces.pack`: a pair file -> packed rows with REDI's ``sequence_weight``.
"""

from distill_jax.traces.config import TracesConfig, load_traces_config
from distill_jax.traces.selection import select, select_to_file
from distill_jax.traces.verify import Verifier, make_verifier

__all__ = ["TracesConfig", "Verifier", "load_traces_config", "make_verifier", "select",
           "select_to_file"]
