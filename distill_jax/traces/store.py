"""The traces output directory: kill-safe, exactly-once, shared by independent processes.

Layout of ``OUT``::

    OUT/manifest.json             what produced the samples (teacher, prompts and their hash,
                                  sampling settings, verifier, seed, group size)
    OUT/parts/group-000012.jsonl  every sample of the prompts of group 12, one JSON line each
    OUT/traces.jsonl              all parts in prompt order, once every group is written
    OUT/summary.json              pass@1, pass@N, kept fraction, mean length of traces.jsonl

Prompts are cut into fixed groups of ``prompts_per_group`` consecutive prompts (by position in
the prompt set); group ``g`` belongs to process ``g % process_count``. A group is the unit of
work and of commit: its samples are generated together, then written to a temporary file in
``parts/``, fsynced, and renamed to ``group-NNNNNN.jsonl`` (then the directory is fsynced), so
a part is either absent or complete. A process skips every group whose part exists, so a
killed run restarted on the same ``OUT`` loses nothing and duplicates nothing, and processes
never coordinate. Sampling keys depend only on the seed and the group (never on the process
count or on what ran before), so an interrupted run, or a run split over several processes,
gives the same data set as one uninterrupted run. ``traces.jsonl`` and ``summary.json`` are
written (atomically; any process may, with the same content) once all parts exist.

The manifest is written once; a later run on the same ``OUT`` must match it, or is refused
with the differing keys (a new output directory is the fix).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from distill_jax import fsutil

FORMAT = "distill-jax traces"
VERSION = 1
MANIFEST = "manifest.json"
PARTS = "parts"
TRACES = "traces.jsonl"
SUMMARY = "summary.json"
_PART_RE = re.compile(r"group-(\d{6,})\.jsonl")


class TracesDirError(ValueError):
    """An output directory that holds another run's traces, or damaged parts."""


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`distill_jax.fsutil.write_atomic`)."""
    return fsutil.write_atomic(path, text)


def jsonl(records: Iterable[Mapping[str, Any]]) -> str:
    """JSON lines (UTF-8 kept as is) of ``records``."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (blank lines skipped); a bad line raises naming it."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TracesDirError(f"{path}:{n}: not valid JSON ({e}); the file is damaged: "
                                     "delete it and rerun to regenerate it") from None
    return out


class TracesDir:
    """One traces output directory (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.parts = self.path / PARTS

    def open(self, manifest: Mapping[str, Any]) -> None:
        """Create the directory and its manifest, or check an existing manifest matches."""
        if self.path.exists() and not self.path.is_dir():
            raise TracesDirError(f"traces output {self.path} is a file; choose a directory")
        old = self.manifest()
        want = {"format": FORMAT, "version": VERSION, **manifest}
        if old is None:
            if self.path.is_dir() and any(p.name not in (PARTS, MANIFEST)
                                          for p in self.path.iterdir()):
                raise TracesDirError(f"traces output {self.path} is a non-empty directory "
                                     "without a traces manifest; choose a new directory")
            self.parts.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path / MANIFEST, json.dumps(want, indent=2) + "\n")
            return
        diff = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {want.get(k)!r}" for k in diff[:4])
            raise TracesDirError(f"traces output {self.path} holds samples of another config "
                                 f"({shown}); use a new out directory, or the old settings")
        self.parts.mkdir(parents=True, exist_ok=True)

    def manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when there is none yet."""
        path = self.path / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TracesDirError(f"{path} is unreadable ({e}); choose a new out directory") \
                from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TracesDirError(f"{path} is not a traces manifest; choose a new out directory")
        return data

    def part_path(self, group: int) -> Path:
        return self.parts / f"group-{group:06d}.jsonl"

    def done_groups(self) -> set[int]:
        """Groups whose part is committed (temporary files of killed writers are ignored)."""
        if not self.parts.is_dir():
            return set()
        return {int(m.group(1)) for p in self.parts.iterdir()
                if (m := _PART_RE.fullmatch(p.name)) is not None}

    def write_part(self, group: int, records: list[Mapping[str, Any]]) -> None:
        """Commit group ``group``'s records (atomically; a committed group is never rewritten)."""
        if self.part_path(group).exists():
            return
        write_text_atomic(self.part_path(group), jsonl(records))

    def read_part(self, group: int) -> list[dict[str, Any]]:
        return read_jsonl(self.part_path(group))

    def finalize(self, num_groups: int, summary: Mapping[str, Any] | None = None) -> bool:
        """Write ``traces.jsonl`` (every part in group order) and ``summary.json`` once all
        ``num_groups`` parts exist; returns whether the data set is complete."""
        if len(self.done_groups() & set(range(num_groups))) < num_groups:
            return False
        if not (self.path / TRACES).exists():
            text = "".join(self.part_path(g).read_text(encoding="utf-8")
                           for g in range(num_groups))
            write_text_atomic(self.path / TRACES, text)
        if summary is not None:
            write_text_atomic(self.path / SUMMARY, json.dumps(dict(summary), indent=2) + "\n")
        return True

    def traces(self) -> list[dict[str, Any]]:
        """Every sample written so far (all committed parts, in prompt order)."""
        if (self.path / TRACES).exists():
            return read_jsonl(self.path / TRACES)
        out: list[dict[str, Any]] = []
        for g in sorted(self.done_groups()):
            out += self.read_part(g)
        return out


__all__ = ["MANIFEST", "PARTS", "SUMMARY", "TRACES", "TracesDir", "TracesDirError", "jsonl",
           "read_jsonl", "write_text_atomic"]
