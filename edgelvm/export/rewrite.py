"""The seam between export and the compression stages that change a traced graph (quantization, so far).

Export traces the float module, then applies a :class:`GraphRewrite` to the ONNX file *before* its parity check,
with the torch module put into the state that computes what the rewritten graph computes (``reference``). So a
quantized graph is checked against its own torch-side definition, exactly like a float one, and export needs to know
nothing about how the rewrite works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_EXTERNAL_DATA_BYTES = 1 << 30


@dataclass
class GraphRewrite:
    #: Manifest label of the rewritten graph (e.g. ``int8``, ``int4``).
    precision: str
    #: Largest relative error against the reference accepted at export.
    tolerance: float
    #: ``(onnx model, module-path prefix of the traced wrapper) -> (model, summary for the manifest)``.
    apply: Callable[[Any, str], tuple[Any, dict[str, Any]]]
    #: Given the traced torch module, a context in which it computes what the rewritten graph computes.
    reference: Callable[[Any], contextlib.AbstractContextManager] | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def rewrite_file(self, path: Path, prefix: str) -> None:
        import onnx

        model = onnx.load(str(path))
        model, self.summary = self.apply(model, prefix)
        large = sum(t.ByteSize() for t in model.graph.initializer) > _EXTERNAL_DATA_BYTES
        for stale in path.parent.glob(f"{path.name}.data"):
            stale.unlink()
        onnx.save(model, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)

    def reference_context(self, module: Any) -> contextlib.AbstractContextManager:
        return self.reference(module) if self.reference is not None else contextlib.nullcontext()
