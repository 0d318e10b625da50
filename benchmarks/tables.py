"""A benchmark's output: its table as JSON (with a `rows` list) and its Markdown twin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_table(stem: Path, payload: dict[str, Any], markdown: str) -> None:
    """Writes stem.json and stem.md, making stem's folder where needed."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown + "\n")
