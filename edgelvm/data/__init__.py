"""Image-text datasets: LLaVA-format jsonl reading/writing and the synthetic shapes VQA task.

Kept import-light (numpy, Pillow, tokenizers only; never torch), so the torch-free runtime and the CLI can use it.
"""

from edgelvm.data.jsonl import VQARecord, load_jsonl_dataset, write_jsonl_dataset
from edgelvm.data.shapes import (
    QTYPES,
    SPLIT_SEEDS,
    SPLIT_SIZES,
    Sample,
    Shape,
    generate_sample,
    generate_shipped_splits,
    generate_split,
    write_shipped_splits,
    write_split,
)

__all__ = [
    "QTYPES",
    "SPLIT_SEEDS",
    "SPLIT_SIZES",
    "Sample",
    "Shape",
    "VQARecord",
    "generate_sample",
    "generate_shipped_splits",
    "generate_split",
    "load_jsonl_dataset",
    "write_jsonl_dataset",
    "write_shipped_splits",
    "write_split",
]
