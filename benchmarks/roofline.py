"""Decode against the memory-bandwidth roofline (issue 10): the realistic-shape model, fp32, both decoder graphs.

Measures this machine's bandwidth, then decode tokens/s for the fused (in-place KV, GroupQueryAttention) and the
portable (traced) decoders next to HF ``generate``, each as a fraction of the roofline (decoder weight bytes per
token / bandwidth), with kernels per decode step, prefill ms and vision ms. It is ``runtime_vs_hf.py`` restricted
to the realistic model and writing ``roofline.{json,md}``. INT4 / INT8 bundles join the table once the quantize
stage exists (issue 6).

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
    runtime_vs_hf.main()
