"""The traces config: which teacher samples what, how often, checked how, written where.

``load_traces_config(path, overrides)`` reads a YAML file (``configs/traces_tiny.yaml``) with
dotted ``key=value`` overrides into a frozen :class:`TracesConfig`; unknown keys are refused
with the closest valid name, as for run configs. Relative input paths (``prompts.path``,
``teacher.hf_path``, ``tokenizer``) are relative to the file that names them; ``out`` and every
override are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from distill_jax import configlib
from distill_jax.config import MeshConfig, ModelSource, resolve_input_paths
from distill_jax.data.config import Format
from distill_jax.traces.verify import make_verifier

POLICIES = ("correct", "shortest", "majority", "pairs")


@dataclasses.dataclass(frozen=True)
class PromptsConfig:
    """The prompt data set: records with a prompt and a reference answer. A record is a chat
    record (``messages_field``: the conversation; the prompt is every message before the last
    assistant message, the reference that message's content) or a prompt/response record
    (``prompt_field`` + ``response_field``, e.g. ``distill-jax mathgen`` problems, whose
    response ends ``#### <answer>``). ``max_prompts``: the first N records only (null: all).
    ``chat_template``: render prompts with the tokenizer's chat template (null: when it has
    one; otherwise the prompt text is encoded with the tokenizer's special tokens)."""

    path: str = ""
    format: Format = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    max_prompts: Optional[int] = None
    chat_template: Optional[bool] = None

    def __post_init__(self):
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"prompts.max_prompts must be >= 1 (or null: all), got "
                             f"{self.max_prompts}")


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Optional selection at the end of a finished run (same as ``distill-jax traces select``):
    ``policy`` (null: none) one of ``correct``, ``shortest``, ``majority``, ``pairs``;
    ``max_per_prompt`` caps the records kept per prompt (null: no cap); ``out`` the JSONL file
    (default ``OUT/selected-<policy>.jsonl``)."""

    policy: Optional[Literal["correct", "shortest", "majority", "pairs"]] = None
    max_per_prompt: Optional[int] = None
    out: Optional[str] = None

    def __post_init__(self):
        if self.max_per_prompt is not None and self.max_per_prompt < 1:
            raise ValueError(f"select.max_per_prompt must be >= 1 (or null: no cap), got "
                             f"{self.max_per_prompt}")


@dataclasses.dataclass(frozen=True)
class TracesConfig:
    """``distill-jax traces``: the ``teacher`` samples ``samples`` completions per prompt of
    ``prompts`` (at ``temperature``, optionally within ``top_k`` / the ``top_p`` nucleus, at
    most ``max_new_tokens`` tokens each, ``batch_size`` sequences per generation call), the
    ``verifier`` (``math``, ``exact`` or ``module:function``) judges each against the prompt's
    reference, and every sample is written to the output directory ``out`` (see
    :mod:`distill_jax.traces.store`). ``tokenizer``: the teacher's tokenizer (a name or a
    directory; default: ``teacher.hf_path``). ``process_index`` / ``process_count``: which share
    of the prompts this process writes (null: JAX's, i.e. 0 of 1 unless a multi-process run
    was launched). ``seed`` fixes the sampling: the same config gives the same data set,
    however often it is interrupted and however many processes share it."""

    out: str = ""
    teacher: ModelSource = dataclasses.field(default_factory=ModelSource)
    tokenizer: Optional[str] = None
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    samples: int = 4
    temperature: float = 0.7
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    max_new_tokens: int = 256
    verifier: str = "math"
    batch_size: int = 8
    seed: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    process_index: Optional[int] = None
    process_count: Optional[int] = None
    progress: bool = True
    select: SelectConfig = dataclasses.field(default_factory=SelectConfig)

    def __post_init__(self):
        if not self.out:
            raise ValueError("traces: set out (the output directory), e.g. out=runs/traces")
        if not self.prompts.path:
            raise ValueError("traces: set prompts.path (a JSONL/Parquet file of prompts with "
                             "reference answers, e.g. from `distill-jax mathgen`)")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1 (completions per prompt), got {self.samples}")
        if self.samples > 1 and not self.temperature > 0:
            raise ValueError(f"samples={self.samples} with temperature={self.temperature} would "
                             "repeat one greedy completion; set temperature > 0 or samples=1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (null: no limit), got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (null: no limit), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (sequences per generation call), got "
                             f"{self.batch_size}")
        if (self.process_index is None) != (self.process_count is None):
            raise ValueError("set both process_index and process_count, or neither")
        if self.process_count is not None and not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index must be in [0, process_count={self.process_count}), "
                             f"got {self.process_index}")
        make_verifier(self.verifier)  # a bad spec fails before any model is loaded

    def tokenizer_path(self) -> str:
        """The teacher's tokenizer: ``tokenizer``, else ``teacher.hf_path``."""
        path = self.tokenizer or self.teacher.hf_path
        if not path:
            raise ValueError("traces: set tokenizer (a name such as 'bytes' or 'smollm2', or a "
                             "directory), or give the teacher an hf_path")
        return path

    @property
    def prompts_per_group(self) -> int:
        """Prompts generated and committed together: all samples of a group fill whole
        generation calls of ``batch_size`` sequences (one prompt when ``samples`` exceeds it)."""
        return max(1, self.batch_size // self.samples)


def _resolve(data: dict[str, Any], directory: Path) -> dict[str, Any]:
    data = resolve_input_paths(data, directory)
    prompts = data.get("prompts")
    if isinstance(prompts, dict) and isinstance(prompts.get("path"), str):
        p = prompts["path"]
        if p and not (os.path.isabs(p) or p.startswith("~") or "://" in p):
            data = {**data, "prompts": {**prompts, "path": os.path.normpath(directory / p)}}
    return data


def load_traces_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TracesConfig:
    """A :class:`TracesConfig` from YAML ``path`` with dotted ``overrides`` (see the module)."""
    return configlib.load(TracesConfig, path, overrides, resolve=_resolve)


__all__ = ["POLICIES", "PromptsConfig", "SelectConfig", "TracesConfig", "load_traces_config"]
