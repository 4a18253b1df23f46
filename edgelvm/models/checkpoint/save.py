"""Writing a model + processor as an edgelvm checkpoint directory (what every stage's output is)."""

from __future__ import annotations

from typing import Any

from edgelvm.models.checkpoint.pruned import RECORD as PRUNE_RECORD
from edgelvm.models.checkpoint.pruned import write_loadable_text_fields

#: Files a processor's ``save_pretrained`` may write that hold its chat template.
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")


def save_checkpoint_files(model: Any, processor: Any, out: Any, source: Any = None) -> None:
    """A model + processor as a checkpoint directory: ``save_pretrained``, or edgelvm's own format for pruned shapes
    that only edgelvm's loader rebuilds. ``source``: the checkpoint the processor came from (see
    :func:`save_processor_files`)."""
    if hasattr(model.config, PRUNE_RECORD):
        save_model_files(model, processor, out, source)
    else:
        model.save_pretrained(out, safe_serialization=True)
        save_processor_files(processor, out, source)


def save_model_files(model: Any, processor: Any, out: Any, source: Any = None) -> None:
    """config + generation config + processor via ``save_pretrained``; weights with the model's own parameter names
    (``safetensors.torch.save_model`` also de-duplicates tied tensors)."""
    from pathlib import Path

    from safetensors.torch import save_model

    out = Path(out)
    model.config.save_pretrained(out)
    write_loadable_text_fields(out / "config.json")
    model.generation_config.save_pretrained(out)
    save_processor_files(processor, out, source)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})


def save_processor_files(processor: Any, out: Any, source: Any = None) -> None:
    """The processor's files in ``out`` as the ``source`` checkpoint has them: a stage must not change the processor
    it was given. Each file ``processor.save_pretrained`` writes is the source's copy where the source (a local
    directory) has that file; a chat template file the source does not have is left out; any other file is the one
    written (e.g. ``tokenizer.json`` for a source that has only ``tokenizer.model``). Without a local source: what
    ``save_pretrained`` writes."""
    import shutil
    import tempfile
    from pathlib import Path

    out = Path(out)
    src = Path(source) if source else None
    if src is None or not src.is_dir():
        processor.save_pretrained(out)
        return
    with tempfile.TemporaryDirectory(prefix="edgelvm-processor-") as tmp:
        processor.save_pretrained(tmp)
        for written in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            rel = written.relative_to(tmp)
            original = src / rel
            if not original.is_file() and rel.parts[0] in _TEMPLATE_FILES:
                continue
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original if original.is_file() else written, out / rel)
