"""`edgelvm plan` wall time per fresh process, from config.json alone, against transformers' config loading.

Each row runs in new processes, interleaved, three times (median shown): ``edgelvm plan DIR --json`` (config.json
read as plain data, no transformers import) and the least that a plan through transformers' config classes pays
(``AutoConfig.from_pretrained(DIR)`` alone: it imports torch). Configs: the public config.json files of real
checkpoints as their publishers wrote them (``tests/fixtures/hub_configs.py``).

    python benchmarks/plan_speed.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.fixtures

from tests.fixtures.hub_configs import write_hub_configs


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_hub_configs(Path(tmp))
        print(f"{'config':<24} {'edgelvm plan (s)':>16} {'AutoConfig only (s)':>20} {'ratio':>7}")
        for name, path in dirs.items():
            plan, auto = [], []
            for _ in range(3):
                plan.append(seconds([sys.executable, "-m", "edgelvm.cli", "plan", str(path), "--json"]))
                load = f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(path)!r})"
                auto.append(seconds([sys.executable, "-c", load]))
            p, a = statistics.median(plan), statistics.median(auto)
            print(f"{name:<24} {p:>16.2f} {a:>20.2f} {p / a:>7.2f}")


if __name__ == "__main__":
    main()
