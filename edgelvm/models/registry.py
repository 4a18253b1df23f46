"""Registry of adapters keyed by ``config.model_type``, and checkpoint loading.

Adapters are registered by dotted path so that listing the supported families never imports torch.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelvm.errors import ExportError, UnsupportedModelError

if TYPE_CHECKING:
    from edgelvm.models.base import VLMAdapter

#: model_type -> "module:Class". A new family is one adapter file plus one line here.
_ADAPTERS: dict[str, str] = {
    "blip-2": "edgelvm.models.blip2:Blip2Adapter",
    "instructblip": "edgelvm.models.instructblip:InstructBlipAdapter",
    "internvl": "edgelvm.models.internvl:InternVLAdapter",
    "idefics": "edgelvm.models.idefics:IdeficsAdapter",
    "idefics3": "edgelvm.models.idefics3:Idefics3Adapter",
    "llava": "edgelvm.models.llava:LlavaAdapter",
    "llava_next": "edgelvm.models.llava_next:LlavaNextAdapter",
    "gemma3": "edgelvm.models.gemma3:Gemma3Adapter",
    "paligemma": "edgelvm.models.paligemma:PaliGemmaAdapter",
    "llava_onevision": "edgelvm.models.llava_onevision:LlavaOnevisionAdapter",
    "smolvlm": "edgelvm.models.idefics3:Idefics3Adapter",
    "qwen2_5_vl": "edgelvm.models.qwen2_vl:Qwen25VLAdapter",
    "qwen2_vl": "edgelvm.models.qwen2_vl:Qwen2VLAdapter",
    "qwen3_vl": "edgelvm.models.qwen3_vl:Qwen3VLAdapter",
    "qwen3_5": "edgelvm.models.qwen3_5:Qwen3_5Adapter",
    "lfm2_vl": "edgelvm.models.lfm2_vl:Lfm2VlAdapter",
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_ADAPTERS))


def adapter_for_model_type(model_type: str, *, where: str | Path | None = None) -> type[VLMAdapter]:
    """The adapter class for ``model_type``; an unsupported type raises listing the supported ones."""
    target = _ADAPTERS.get(model_type)
    if target is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}",
            where=where,
            fix="use a checkpoint of a supported family (see `edgelvm export --help`), or add an adapter under "
            "edgelvm/models/",
        )
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def read_model_type(model_dir: str | Path) -> str:
    """``model_type`` from ``config.json`` without importing transformers (so errors are fast and clear)."""
    return read_config_json(model_dir)["model_type"]


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict holding a string ``model_type``; every defect (missing,
    truncated, not an object, no model_type) is an :class:`~edgelvm.errors.ExportError`."""
    path = Path(model_dir)
    if not path.exists():
        raise ExportError(
            "model directory does not exist",
            where=path,
            fix="pass a local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer and processor "
            "files); download hub models first with `huggingface-cli download`",
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ExportError(
            "config.json is missing: not a Hugging Face checkpoint directory",
            where=path,
            fix="point at the directory written by `save_pretrained` (it holds config.json)",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(
            f"config.json is not valid JSON ({err}); a truncated download?",
            where=config_path,
            fix="restore the file (download the checkpoint's config.json again)",
        ) from None
    if not isinstance(config, dict):
        raise ExportError(
            f"config.json holds a JSON {type(config).__name__}, not an object",
            where=config_path,
            fix="this must be a transformers config.json",
        )
    if not isinstance(config.get("model_type"), str):
        raise ExportError(
            "field 'model_type' is missing", where=config_path, fix="this must be a transformers config.json"
        )
    return config


def _is_local(model: str | Path) -> bool:
    return Path(model).exists() or str(model).startswith((".", "/", "~"))


def load_config(model: str | Path) -> tuple[Any, str]:
    """``(transformers config, source)`` of a local checkpoint directory (config.json alone suffices) or a hub id
    (fetches its config.json: needs network or a populated HF cache). No weights are read; every failure is an
    :class:`~edgelvm.errors.EdgeLVMError`. The family is checked before transformers is imported."""
    if _is_local(model):
        path = Path(model)
        adapter_for_model_type(read_model_type(path), where=path)  # unsupported family: fast and clear
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(path)), str(path)
        except Exception as err:  # transformers' validation errors have no common base
            raise ExportError(
                f"transformers cannot read config.json ({type(err).__name__}: {err})",
                where=path / "config.json",
                fix="restore the checkpoint's config.json (a hand-edited or truncated file?)",
            ) from None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model))
    except Exception as err:  # offline (OSError / HTTP client errors), no such repository, gated, ...
        raise ExportError(
            f"cannot fetch the config of {str(model)!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})",
            where=str(model),
            fix="check the hub id and the network, or download it first (`huggingface-cli download ID --local-dir "
            "DIR`; config.json alone is enough for `edgelvm plan`) and pass the directory",
        ) from None
    adapter_for_model_type(config.model_type, where=str(model))
    return config, str(model)


#: Files that hold a checkpoint's weights, in the order transformers looks for them.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a local checkpoint (the shards an index names, or the single file); ``[]`` when there
    are none. A shard the index names but the directory lacks is an error naming it."""
    path = Path(model_dir)
    for name in WEIGHT_FILES:
        found = path / name
        if not found.is_file():
            continue
        if not name.endswith(".index.json"):
            return [found]
        try:
            shards = sorted(set(json.loads(found.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ExportError(
                f"the weights index is not valid ({type(err).__name__}: {err})",
                where=found,
                fix="restore the file (download it again)",
            ) from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ExportError(
                f"{len(missing)} of {len(shards)} weight shards named by {name} are missing: {', '.join(missing[:3])}"
                + (" …" if len(missing) > 3 else ""),
                where=path,
                fix="finish the download (`huggingface-cli download` resumes it)",
            )
        return [path / s for s in shards]
    return []


def require_weight_files(model_dir: str | Path) -> list[Path]:
    files = weight_files(model_dir)
    if not files:
        raise ExportError(
            f"no weights: none of {', '.join(WEIGHT_FILES)} is here",
            where=model_dir,
            fix="download the checkpoint's weights too (`huggingface-cli download ID --local-dir DIR`), or point at "
            "the directory `save_pretrained` wrote; `edgelvm plan` answers from config.json alone",
        )
    return files


def load_model(model: str | Path, **kwargs) -> VLMAdapter:
    """Load a checkpoint (local directory, or a hub id when online) and wrap it in its family's adapter.

    A local path is checked first so that a typo gives a clear error instead of a hub lookup.
    """
    path = Path(model)
    if _is_local(path):
        model_type = read_model_type(path)
        adapter_for_model_type(model_type, where=path)  # an unsupported family before the weights check
        require_weight_files(path)
        source = str(path)
    else:  # a hub id: let transformers resolve it (needs network or a populated HF cache)
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(model)).model_type
        source = str(model)
    adapter_cls = adapter_for_model_type(model_type, where=source)
    return adapter_cls.from_pretrained(source, **kwargs)
