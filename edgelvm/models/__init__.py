"""Model-family adapters: the only family-specific code in edgelvm.

Export, prune, quantize and eval ask an adapter where things are; they never branch on ``model_type``.
Importing this package is cheap; torch and transformers are imported when a model is loaded.
"""

from edgelvm.models.registry import SUPPORTED_MODEL_TYPES, adapter_for_model_type, load_model, read_model_type

__all__ = ["SUPPORTED_MODEL_TYPES", "adapter_for_model_type", "load_model", "read_model_type"]
