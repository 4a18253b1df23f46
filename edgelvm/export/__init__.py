"""Export: a Hugging Face VLM checkpoint → an edgelvm bundle (ONNX graphs, embedding table, tokenizer, manifest)."""

from edgelvm.export.bundle import ExportConfig, ExportReport, export

__all__ = ["ExportConfig", "ExportReport", "export"]
