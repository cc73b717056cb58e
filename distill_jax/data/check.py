"""Checking data before training on it: every record read, validated and tokenized once.

``check_records(config, tokenizer)`` makes a full pass over the distinct documents of the
configured sources (each ``doc_id`` once, in file order; ``max_records`` applies) and returns a
:class:`CheckReport`: records, bad records with their file and index, documents, tokens, empty
documents (nothing to train on) and documents longer than a row. ``distill-jax data check``
prints it. ``scan_records`` is the bounded version training runs first, so a bad record early in
the data fails in seconds rather than when the loop reaches it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TextIO

from distill_jax.data.config import DataConfig
from distill_jax.data.records import BadRecordError, Records, read_records
from distill_jax.data.tokenize import tokenize_records

__all__ = ["CheckReport", "check_records", "scan_records", "SCAN_RECORDS"]

SCAN_RECORDS = 1000  # records training checks before its first step
_BATCH = 64  # records tokenized together
_MAX_LISTED = 20  # bad records kept in a report (all are counted)


@dataclasses.dataclass
class CheckReport:
    """What a pass over the data found.

    Attributes:
      files: the data files read.
      records: records checked.
      bad_records: how many are unusable; ``bad`` lists the first of them (``BadRecordError``,
        each with ``source``, ``index`` and ``reason``).
      documents: usable documents; ``empty_documents`` of them have no token to train on.
      tokens, teacher_tokens: student (and teacher) tokens of the usable documents.
      trained_tokens: target tokens the loss sees (``loss_mask`` ones).
      long_documents: documents longer than a row (``seq_len``/``teacher_seq_len``): split or
        dropped per ``long_docs``.
      max_tokens: the longest document, in student tokens.
      wall_s: seconds the pass took.
    """

    files: list[str]
    records: int = 0
    bad_records: int = 0
    bad: list[BadRecordError] = dataclasses.field(default_factory=list)
    documents: int = 0
    empty_documents: int = 0
    tokens: int = 0
    teacher_tokens: int = 0
    trained_tokens: int = 0
    long_documents: int = 0
    max_tokens: int = 0
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        """No bad record and something to train on."""
        return not self.bad_records and self.trained_tokens > 0

    def problems(self, config: DataConfig) -> list[str]:
        """One line per problem found, each naming the fix."""
        out = []
        if self.bad_records:
            first = self.bad[0]
            out.append(f"{self.bad_records} of {self.records} records are bad (first: {first.source}: "
                       f"record {first.index}: {first.reason}); fix or remove them, or set "
                       "data.on_bad_record=skip")
        if self.documents and not self.trained_tokens:
            out.append(f"none of the {self.documents} documents has a token to train on (empty text, "
                       "or only prompts with data.loss_on_prompt=false); check data.record and its fields")
        elif self.records and not self.documents:
            out.append(f"no valid record in {', '.join(self.files)}")
        if self.long_documents and config.long_docs == "drop":
            out.append(f"{self.long_documents} documents are longer than a row and are dropped "
                       "(data.long_docs=drop); raise data.seq_len or set data.long_docs=split")
        return out

    def summary(self) -> str:
        """The counts as one line."""
        teacher = f", {self.teacher_tokens} teacher tokens" if self.teacher_tokens else ""
        return (f"{self.records} records ({self.bad_records} bad), {self.documents} documents "
                f"({self.empty_documents} empty, {self.long_documents} longer than a row, longest "
                f"{self.max_tokens} tokens), {self.tokens} tokens{teacher}, {self.trained_tokens} "
                f"trained; {self.wall_s:.1f} s")


def check_records(config: DataConfig, tokenizer, *, teacher_tokenizer=None, limit: int | None = None,
                  progress: TextIO | None = None, records: Records | None = None) -> CheckReport:
    """Read, validate and tokenize every document of ``config`` (the first ``limit`` when given).

    Args:
      config: the data config (sources, record kind and fields, ``seq_len``, ``max_records``).
      tokenizer: the student's tokenizer; ``teacher_tokenizer`` the teacher's when it differs.
      limit: check only the first ``limit`` documents (global ``doc_id`` order).
      progress: a stream for a progress line every few seconds (None: quiet).
      records: already-opened records (default: ``read_records(config)``).

    Returns:
      A :class:`CheckReport`; nothing is raised for bad records (they are reported).
    """
    t0 = last = time.monotonic()
    records = read_records(config) if records is None else records
    report = CheckReport(files=records.files)
    n = records.num_docs if limit is None else min(limit, records.num_docs)
    teacher_len = config.teacher_len if teacher_tokenizer is not None else None
    for lo in range(0, n, _BATCH):
        batch = [records.document(d) for d in range(lo, min(lo + _BATCH, n))]
        good = [r for r in batch if not isinstance(r, BadRecordError)]
        docs = iter(tokenize_records(good, tokenizer, config, teacher_tokenizer=teacher_tokenizer))
        for item in (r if isinstance(r, BadRecordError) else next(docs) for r in batch):
            report.records += 1
            if isinstance(item, BadRecordError):
                report.bad_records += 1
                if len(report.bad) < _MAX_LISTED:
                    report.bad.append(item)
                continue
            report.documents += 1
            count = len(item.student)
            trained = int(item.student.trained[1:].sum())
            report.tokens += count
            report.trained_tokens += trained
            report.empty_documents += trained == 0
            report.max_tokens = max(report.max_tokens, count)
            long = count > config.seq_len
            if item.teacher is not None:
                report.teacher_tokens += len(item.teacher)
                long = long or len(item.teacher) > teacher_len
            report.long_documents += long
        if progress is not None and time.monotonic() - last > 5:
            last = time.monotonic()
            print(f"checked {report.records}/{n} records", file=progress, flush=True)
    report.wall_s = time.monotonic() - t0
    return report


def scan_records(config: DataConfig, tokenizer, *, teacher_tokenizer=None, limit: int = SCAN_RECORDS,
                 records: Records | None = None) -> CheckReport:
    """Check the first ``limit`` documents before training; raises the first bad record's
    :class:`BadRecordError` when ``config.on_bad_record == "raise"``."""
    report = check_records(config, tokenizer, teacher_tokenizer=teacher_tokenizer, limit=limit,
                           records=records)
    if report.bad and config.on_bad_record == "raise":
        raise report.bad[0]
    return report


def main_check(config: DataConfig, tokenizer, *, teacher_tokenizer=None, out: TextIO | None = None) -> CheckReport:
    """:func:`check_records` with progress on stderr, then the report on ``out`` (default:
    stdout; the CLI's ``data check``)."""
    out = sys.stdout if out is None else out
    report = check_records(config, tokenizer, teacher_tokenizer=teacher_tokenizer, progress=sys.stderr)
    print(f"data: {', '.join(report.files)}", file=out)
    print(report.summary(), file=out)
    for err in report.bad:
        print(f"  bad record: {err.source}: record {err.index}: {err.reason}", file=out)
    if report.bad_records > len(report.bad):
        print(f"  ... and {report.bad_records - len(report.bad)} more bad records", file=out)
    for line in report.problems(config):
        print(f"problem: {line}", file=out)
    print("ok" if report.ok else "not ok", file=out)
    return report
