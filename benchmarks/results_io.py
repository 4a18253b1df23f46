"""Where every benchmark script leaves its numbers: ``<results>/<name>.json`` (everything measured) and
``<results>/<name>.md`` (the table the docs quote), the table also printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_results(results: str | Path, name: str, summary: dict[str, Any], table: str) -> None:
    directory = Path(results)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
    (directory / f"{name}.md").write_text(table)
    print(table)
