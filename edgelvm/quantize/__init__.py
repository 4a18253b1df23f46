"""Quantization (issue 6, in progress): block-wise INT4 weights in ONNX Runtime's MatMulNBits layout (RTN so far).

Not yet a pipeline stage: no ``edgelvm quantize`` verb, no calibration, AWQ / GPTQ or INT8 vision yet.
"""
