"""Calibration for the quantize stage: calibration sets, activation statistics collected once, and observers.

- :mod:`~edgelvm.calibration.dataset` — records (jsonl / LLaVA conversation format, or the shipped shapes task)
  turned into real model inputs through the checkpoint's own processor.
- :mod:`~edgelvm.calibration.stats` — one pass over the set with hooks on the linear layers; per layer the input's
  per-channel mean |x| and max |x|, a histogram of |x| and, where asked, the Gram matrix ``XᵀX`` (what AWQ's scale
  search and GPTQ need). Every algorithm reads the same statistics.
- :mod:`~edgelvm.calibration.observers` — histogram → clipping range: minmax, percentile, entropy (KL, as
  TensorRT's calibrator), MSE.
"""
