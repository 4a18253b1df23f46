"""The torch-free runtime: numpy + ONNX Runtime (+ TensorRT later). Never imports torch or transformers.

from edgelvm.runtime import VLM
vlm = VLM.load("bundle/")
for piece in vlm.generate("photo.jpg", "What is on the table?", stream=True):
    print(piece, end="")
"""

from edgelvm.runtime.sampling import SamplingConfig
from edgelvm.runtime.vlm import VLM, ChatSession, Control, GenerationConfig, GenerationStats, Request

__all__ = ["VLM", "ChatSession", "Control", "GenerationConfig", "GenerationStats", "Request", "SamplingConfig"]
