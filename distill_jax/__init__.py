"""distill-jax: JAX-native distillation of large language models into small ones.

Submodules load on first use (``import distill_jax`` itself imports nothing heavy and changes
no global state)::

    from distill_jax import models, losses, sharding, data
    model = models.load_hf("path/to/hf_dir")
"""

import importlib

__version__ = "0.1.0"
_SUBMODULES = ("assets", "checkpoint", "config", "configlib", "data", "eval", "export", "losses",
               "metrics", "models", "sharding", "tokenizer", "train")
__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"distill_jax.{name}")
    raise AttributeError(f"module 'distill_jax' has no attribute {name!r}")
