"""Typed, frozen configuration of the data pipeline (embedded in the run config, loaded from YAML)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

Format = Literal["auto", "jsonl", "parquet", "arrow", "saved", "load_dataset"]
RecordKind = Literal["text", "prompt_response", "chat", "pairs"]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One data source: a file, a directory or a glob, read in one format.

    Attributes:
      path: a file, a directory (every data file inside, sorted; or a ``datasets.save_to_disk``
        directory) or a glob (``data/*.jsonl``, ``**`` allowed). Matches are sorted by name.
      format: ``auto`` picks by extension (``.jsonl``/``.json``/``.ndjson``, ``.parquet``,
        ``.arrow``/``.feather``/``.ipc``) or recognises a ``save_to_disk`` directory; ``jsonl``,
        ``parquet``, ``arrow`` (Arrow IPC file or stream), ``saved`` (``datasets.save_to_disk``
        output) force one; ``load_dataset`` runs ``datasets.load_dataset(load_dataset_builder,
        data_files=<matched files>, split=split)`` over local files.
      weight: the source's share of the mixture (relative; see ``read_records``).
      split: the split to take from a saved ``DatasetDict`` or from ``load_dataset``.
      load_dataset_builder: the ``datasets`` builder for ``format="load_dataset"`` (``"json"``,
        ``"parquet"``, ``"csv"``, ``"text"``, ...).
    """

    path: str
    format: Format = "auto"
    weight: float = 1.0
    split: str = "train"
    load_dataset_builder: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Records -> tokens -> packed rows -> batches.

    Attributes:
      sources: the data sources, mixed by their weights.
      record: what a record holds: ``text`` (``text_field``), ``prompt_response``
        (``prompt_field`` + ``response_field``, concatenated as is), or ``chat``
        (``messages_field``: a list of ``{"role", "content"}``, rendered with the tokenizer's chat
        template; a record without it but with ``prompt_field``/``response_field`` becomes a
        user/assistant exchange); or ``pairs``: REDI's pair records (``distill-jax traces select
        --policy pairs``): ``messages_field`` ending with the chosen assistant reply and
        ``rejected_field`` the rejected completion, packed as whole pairs with per-token
        ``sequence_weight`` (:mod:`distill_jax.data.pairs`).
      rejected_field: the rejected completion of a ``pairs`` record.
      loss_on_prompt: also train on prompt / non-assistant tokens.
      seq_len: tokens per packed student row.
      teacher_seq_len: tokens per packed teacher row in cross-tokenizer runs (None = ``seq_len``).
      alignment: how cross-tokenizer runs chunk the text (``chunk_ids`` / ``teacher_chunk_ids``;
        see :mod:`distill_jax.xtok.align`): ``unconstrained`` closes a chunk at every byte where
        both tokenizations have a token boundary (the smallest spans covering identical bytes);
        ``space`` only at those followed by whitespace, at the end of the text or at a special
        token, so chunks are whole words (with their leading space).
      batch_size: rows per global batch; each of ``process_count`` processes yields
        ``batch_size // process_count`` rows.
      long_docs: a document longer than a row is ``split`` into pieces in consecutive rows or
        ``drop``ped (counted).
      add_bos: prepend BOS (None = what the tokenizer does by default). Never doubled.
      add_eos: append EOS unless the document already ends with it (trailing whitespace aside).
      shuffle: shuffle documents globally, differently every epoch.
      seed: seed of the shuffle and of the mixture interleave.
      num_epochs: passes over the data (None = repeat forever).
      workers: tokenizer worker processes (0 = tokenize in the calling process).
      on_bad_record: ``raise`` (with the file and record index) or ``skip`` (and count).
      max_records: read at most this many records from each source (the first ones in file
        order); for quick runs.
      num_shards: data shards of each global batch (None = the process count); a fixed value
        makes batches independent of how many processes read them (see ``data.shards``).
    """

    sources: tuple[SourceConfig, ...] = ()
    record: RecordKind = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    rejected_field: str = "rejected"
    loss_on_prompt: bool = False
    seq_len: int = 512
    teacher_seq_len: Optional[int] = None
    alignment: Literal["unconstrained", "space"] = "unconstrained"
    batch_size: int = 8
    long_docs: Literal["split", "drop"] = "split"
    add_bos: Optional[bool] = None
    add_eos: bool = True
    shuffle: bool = True
    seed: int = 0
    num_epochs: Optional[int] = None
    workers: int = 0
    on_bad_record: Literal["raise", "skip"] = "raise"
    max_records: Optional[int] = None
    num_shards: Optional[int] = None

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, got {self.seq_len}")
        if self.teacher_seq_len is not None and self.teacher_seq_len < 2:
            raise ValueError(f"data.teacher_seq_len must be at least 2 (or null), got {self.teacher_seq_len}")
        if self.alignment not in ("unconstrained", "space"):
            raise ValueError(f"data.alignment must be 'unconstrained' or 'space', got {self.alignment!r}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"data.num_epochs must be positive or null (forever), got {self.num_epochs}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"data.max_records must be positive or null, got {self.max_records}")
        for i, s in enumerate(self.sources):
            if not s.weight > 0:
                raise ValueError(f"data.sources[{i}].weight must be > 0, got {s.weight}")
            if s.format == "load_dataset" and not s.load_dataset_builder:
                raise ValueError(f"data.sources[{i}]: format 'load_dataset' needs load_dataset_builder "
                                 "(e.g. 'json', 'parquet', 'csv', 'text')")

    @property
    def teacher_len(self) -> int:
        """Tokens per packed teacher row."""
        return self.seq_len if self.teacher_seq_len is None else self.teacher_seq_len
