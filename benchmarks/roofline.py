"""Decode against the memory-bandwidth roofline (issue 10): the realistic-shape model, fp32, both decoder graphs.

Measures this machine's bandwidth, then decode tokens/s for the fused (in-place KV, GroupQueryAttention) and the
portable (traced) decoders next to HF ``generate``, each as a fraction of the roofline (decoder weight bytes per
token / bandwidth), with kernels per decode step, prefill ms and vision ms — and the INT4 rows (layers INT4 with the
LM head fp32 or INT4, MatMulNBits accuracy_level 0 and 4). It is ``runtime_vs_hf.py --int4`` restricted to the
realistic model and writing ``roofline.{json,md}``; ``matmul_ceiling.py`` measures the INT4 kernels' own ceiling.

    python benchmarks/roofline.py --rounds 5
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import runtime_vs_hf

if __name__ == "__main__":
    if "--worker" not in sys.argv:
        defaults = {"--models": "realistic", "--name": "roofline"}
        for flag, value in defaults.items():
            if flag not in sys.argv:
                sys.argv += [flag, value]
        if "--int4" not in sys.argv:
            sys.argv.append("--int4")
    runtime_vs_hf.main()
