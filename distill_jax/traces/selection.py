"""Selection policies: a traces data set -> a training data set of ordinary chat records.

Policies (per prompt, over its samples in sample order):

* ``correct``: every sample the verifier accepted;
* ``shortest``: the shortest accepted sample (fewest generated tokens; ties: the first);
* ``majority``: the samples whose answer is the prompt's most frequent answer among all its
  samples (self-consistency: needs no reference; ties: the answer seen first; samples without
  an answer never vote);
* ``pairs``: one accepted and one rejected sample per prompt (the shortest accepted, the first
  rejected), for REDI; prompts without both are dropped.

``max_per_prompt`` caps the records per prompt (the first ones, in the policy's order: for
``correct`` and ``majority`` shortest first).

Output records are chat records, so plain SFT reads them (``data.record: chat``)::

    {"messages": [...prompt..., {"role": "assistant", "content": COMPLETION}],
     "prompt_id": 7, "sample": 2}

and for ``pairs`` the rejected completion rides along::

    {"messages": [..., {"role": "assistant", "content": CHOSEN}], "rejected": REJECTED,
     "prompt_id": 7, "sample": 2, "rejected_sample": 0}
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any, Sequence

from distill_jax.traces.config import POLICIES
from distill_jax.traces.store import TRACES, TracesDir, read_jsonl, write_text_atomic, jsonl


def _by_prompt(records: Sequence[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = collections.defaultdict(list)
    for r in records:
        groups[r["prompt_id"]].append(r)
    return {k: sorted(v, key=lambda r: r["sample"]) for k, v in sorted(groups.items())}


def _shortest_first(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=lambda r: (r["length"], r["sample"]))


def _majority(samples: list[dict]) -> list[dict]:
    votes = collections.Counter(r["answer"] for r in samples if r.get("answer") is not None)
    if not votes:
        return []
    best = max(votes.values())
    winner = next(r["answer"] for r in samples if votes.get(r.get("answer")) == best)
    return [r for r in samples if r.get("answer") == winner]


def _chat(r: dict) -> dict[str, Any]:
    return {"messages": list(r["messages"]) + [{"role": "assistant", "content": r["completion"]}],
            "prompt_id": r["prompt_id"], "sample": r["sample"]}


def select(records: Sequence[dict], policy: str, *, max_per_prompt: int | None = None
           ) -> list[dict[str, Any]]:
    """The training records ``policy`` keeps from traces ``records`` (see the module)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; use one of {', '.join(POLICIES)}")
    if max_per_prompt is not None and max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be >= 1 (or None: no cap), got {max_per_prompt}")
    out: list[dict[str, Any]] = []
    for samples in _by_prompt(records).values():
        good = [r for r in samples if r["verdict"]]
        if policy == "correct":
            kept = _shortest_first(good)
        elif policy == "shortest":
            kept = _shortest_first(good)[:1]
        elif policy == "majority":
            kept = _shortest_first(_majority(samples))
        else:
            bad = [r for r in samples if not r["verdict"]]
            if not good or not bad:
                continue
            chosen = _shortest_first(good)[0]
            out.append({**_chat(chosen), "rejected": bad[0]["completion"],
                        "rejected_sample": bad[0]["sample"]})
            continue
        out += [_chat(r) for r in kept[:max_per_prompt]]
    return out


def select_to_file(traces: str | Path, policy: str, out: str | Path | None = None, *,
                   max_per_prompt: int | None = None) -> tuple[Path, int]:
    """Select from a traces directory (or a traces JSONL file) into ``out`` (default:
    ``DIR/selected-<policy>.jsonl``), atomically; (path, number of records)."""
    traces = Path(traces)
    if traces.is_dir():
        if not (traces / TRACES).exists():
            raise FileNotFoundError(f"{traces} has no {TRACES} yet: the traces run is not "
                                    "finished (rerun `distill-jax traces` with its config)")
        records = TracesDir(traces).traces()
        default = traces / f"selected-{policy}.jsonl"
    elif traces.is_file():
        records = read_jsonl(traces)
        default = traces.with_name(f"{traces.stem}-{policy}.jsonl")
    else:
        raise FileNotFoundError(f"traces {traces} not found; give the out directory of a "
                                "`distill-jax traces` run")
    rows = select(records, policy, max_per_prompt=max_per_prompt)
    path = Path(out) if out else default
    write_text_atomic(path, jsonl(rows))
    return path, len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``distill-jax traces select TRACES --policy P [--max-per-prompt K] [--out FILE]``"""
    parser = argparse.ArgumentParser(
        prog="distill-jax traces select",
        description="Turn a traces data set into chat records for training: all correct "
                    "samples, the shortest correct one, the majority-consistent ones, or "
                    "correct/incorrect pairs (for the redi loss term).")
    parser.add_argument("traces", help="a traces out directory (or its traces.jsonl)")
    parser.add_argument("--policy", required=True, choices=POLICIES)
    parser.add_argument("--max-per-prompt", type=int, default=None,
                        help="keep at most this many records per prompt")
    parser.add_argument("--out", default=None,
                        help="output JSONL (default: TRACES/selected-<policy>.jsonl)")
    args = parser.parse_args(argv)
    path, n = select_to_file(args.traces, args.policy, args.out,
                             max_per_prompt=args.max_per_prompt)
    print(f"wrote {n} {args.policy} records to {path}", file=sys.stderr)
    return 0


__all__ = ["main", "select", "select_to_file"]
