"""The edgelvm checkpoint format, in one place: a Hugging Face checkpoint directory that the stages (distill, prune,
quantize) write and that :func:`edgelvm.models.load_model` and export read. What edgelvm adds to it:

- :mod:`.pruned` — ``config.edgelvm_pruning``: per-layer shapes no transformers config can describe, and the loader
  that cuts a fresh skeleton to them;
- :mod:`.quantized` — ``config.edgelvm_quantization`` and the integer sidecars (``int4.safetensors``,
  ``int8.safetensors``, ``int8_llm.safetensors``) holding :mod:`.codes`' INT4 / INT8 values;
- :mod:`.activations` — the A8 half of a W8A8 checkpoint, installed when it is loaded;
- :mod:`.save` — writing a model + processor as such a directory.

It imports nothing from the stages or export: they depend on it.
"""
