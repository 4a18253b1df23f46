"""Regenerate ``edgelvm/models/config_defaults.json``: the declared defaults of the transformers config classes the
families use, so ``edgelvm plan`` can read a config.json without importing transformers (whose config classes import
torch: ~3 s per process). ``tests/test_plan_config.py`` fails when the installed transformers no longer matches it.

Usage: ``.venv/bin/python scripts/config_defaults.py`` (after upgrading transformers).
"""

from __future__ import annotations

import json

from edgelvm.manifest import write_text_atomic
from edgelvm.models.config_json import DEFAULTS_PATH, snapshot_defaults

if __name__ == "__main__":
    write_text_atomic(DEFAULTS_PATH, json.dumps(snapshot_defaults(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {DEFAULTS_PATH}")
