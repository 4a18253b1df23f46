"""``edgelvm quantize``: INT4 weight-only language model (RTN, AWQ, GPTQ) and INT8 W8A8 vision encoder.

``quantize(model, calib_data, QuantConfig(...)) -> QuantReport``; the export stage writes the ONNX Runtime and
TensorRT forms of the result (:mod:`edgelvm.quantize.export`).
"""

from edgelvm.quantize.api import QuantConfig, QuantReport, quantize

__all__ = ["QuantConfig", "QuantReport", "quantize"]
