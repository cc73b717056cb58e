"""Shared by the benchmark scripts: print the result as JSON and optionally save it."""

from __future__ import annotations

import json
from typing import Any


def emit(result: Any, out: str | None) -> None:
    """Print ``result`` as JSON on stdout and, with ``out``, write the same JSON there."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
