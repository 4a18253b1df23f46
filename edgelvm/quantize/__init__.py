"""``edgelvm quantize``: INT4 weight-only language model (RTN, AWQ, GPTQ), SmoothQuant W8A8, INT8 W8A8 vision.

``quantize(model, calib_data, [AWQConfig(group_size=64), Int8VisionConfig()], out=...) -> QuantReport`` (paths in,
a checkpoint out) over the library verb ``quantize_model(adapter, methods, calib)``; one typed config per method
(:mod:`edgelvm.quantize.methods`), applied by the handler registered for its type
(:mod:`edgelvm.quantize.handlers`). The export stage writes the ONNX Runtime and TensorRT forms of the result.
"""

from edgelvm.quantize.api import QuantizedModel, QuantReport, quantize, quantize_model, save_quantized
from edgelvm.quantize.handlers import Handler, register_handler
from edgelvm.quantize.methods import (
    AWQConfig,
    GPTQConfig,
    Int8VisionConfig,
    MethodConfig,
    ObserverSweep,
    RTNConfig,
    SmoothQuantConfig,
    method_config,
)

__all__ = [
    "AWQConfig",
    "GPTQConfig",
    "Handler",
    "Int8VisionConfig",
    "MethodConfig",
    "ObserverSweep",
    "QuantReport",
    "QuantizedModel",
    "RTNConfig",
    "SmoothQuantConfig",
    "method_config",
    "quantize",
    "quantize_model",
    "register_handler",
    "save_quantized",
]
