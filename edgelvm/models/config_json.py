"""config.json as plain data, with transformers' declared defaults, for answers that need no model.

``edgelvm plan`` (and the fit check that ``export --target`` runs before loading weights) needs a few sizes from a
checkpoint's config. transformers' config classes import torch (~3 s per process); this reader takes their defaults
from ``config_defaults.json``, a snapshot written by ``scripts/config_defaults.py`` from the installed transformers
and checked against it by the tests. It follows transformers' own rules for composite configs (sub-configs built
from a dict with its ``model_type``, or from the class's spec defaults when absent); a family whose config.json has
another layout (Qwen2-VL's flat hub configs) normalises it in its adapter's ``plain_config_layout``. Where a class
is not in the snapshot, :func:`read_plain_config` returns None and the caller uses transformers.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgelvm.errors import ExportError

DEFAULTS_PATH = Path(__file__).with_name("config_defaults.json")
_NUMBER_TYPES = {"int": (int,), "float": (int, float)}


class PlainConfig:
    """Attribute access over one config dict (its class's defaults filled in), like a transformers config for the
    arithmetic that reads it: missing fields raise AttributeError, ``attribute_map`` aliases resolve."""

    def __init__(self, values: dict[str, Any], attribute_map: dict[str, str], class_name: str) -> None:
        self.__dict__["_values"] = values
        self.__dict__["_aliases"] = attribute_map
        self.__dict__["_class_name"] = class_name

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__["_values"]
        name = self.__dict__["_aliases"].get(name, name)
        if name in values:
            return values[name]
        raise AttributeError(f"{self.__dict__['_class_name']} has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a plain config is read-only")

    def get_text_config(self, decoder: bool | None = None) -> Any:
        """The decoder's config, found where transformers looks for it."""
        found = [
            getattr(self, n)
            for n in ("decoder", "generator", "text_config")
            if isinstance(self._values.get(n), PlainConfig)
        ]
        return found[0] if len(found) == 1 else self

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, PlainConfig) else v for k, v in self._values.items()}

    def __repr__(self) -> str:
        return f"PlainConfig({self._class_name})"


@lru_cache(maxsize=1)
def stored_snapshot() -> dict[str, Any]:
    return json.loads(DEFAULTS_PATH.read_text(encoding="utf-8"))


def read_plain_config(raw: dict[str, Any], *, where: Path) -> PlainConfig | None:
    """``raw`` (a parsed config.json, already normalised by its adapter) with defaults filled in; None when a class
    it needs is not in the snapshot. A number field holding something else is an :class:`ExportError`."""
    snapshot = stored_snapshot()
    class_name = snapshot["model_types"].get(raw.get("model_type", ""))
    if class_name is None:
        return None
    try:
        return _build(raw, class_name, snapshot, where, prefix="")
    except _NotInSnapshot:
        return None


class _NotInSnapshot(Exception):
    pass


def _build(raw: dict[str, Any], class_name: str, snapshot: dict[str, Any], where: Path, prefix: str) -> PlainConfig:
    spec = snapshot["classes"].get(class_name)
    if spec is None:
        raise _NotInSnapshot(class_name)
    values = {"model_type": spec["model_type"], **spec["defaults"]}
    for key, value in raw.items():
        expected = spec["types"].get(key, "")
        kinds = _NUMBER_TYPES.get(expected.removesuffix(" | None"))
        allowed_none = expected.endswith(" | None")
        if (
            kinds
            and not (isinstance(value, kinds) and not isinstance(value, bool))
            and not (value is None and allowed_none)
        ):
            raise ExportError(
                f"field '{prefix}{key}' is {value!r}; transformers' {class_name} expects {expected}",
                where=where,
                fix="restore the checkpoint's config.json (a hand-edited or truncated file?)",
            )
        values[key] = value
    for key, sub in spec["sub_configs"].items():
        given = raw.get(key)
        if given is None and sub["optional"]:
            values[key] = None
            continue
        if given is not None and not isinstance(given, dict):
            raise ExportError(
                f"field '{prefix}{key}' is a {type(given).__name__}, not an object",
                where=where,
                fix="restore the checkpoint's config.json (a hand-edited or truncated file?)",
            )
        sub_raw = dict(given) if given is not None else dict(sub["init_kwargs"])
        if sub["config_class"] == "auto":
            sub_type = sub_raw.get("model_type") or sub["model_type"]
            sub_class = snapshot["model_types"].get(sub_type)
            if sub_class is None:
                raise _NotInSnapshot(sub_type)
            sub_raw.setdefault("model_type", sub_type)
        else:
            sub_class = sub["config_class"]
        values[key] = _build(sub_raw, sub_class, snapshot, where, prefix=f"{prefix}{key}.")
    return PlainConfig(values, spec["attribute_map"], class_name)


def snapshot_defaults() -> dict[str, Any]:
    """The snapshot ``config_defaults.json`` holds, from the installed transformers (imports it, and torch)."""
    import dataclasses

    import transformers
    from transformers import CONFIG_MAPPING

    from edgelvm.models.registry import SUPPORTED_MODEL_TYPES, adapter_for_model_type

    # Auto sub-configs may name any model type: the text models the adapters accept and the common vision towers.
    extra = {"clip_vision_model", "siglip_vision_model"}
    for model_type in SUPPORTED_MODEL_TYPES:
        extra.update(adapter_for_model_type(model_type).supported_text_models or ())
    classes: dict[str, Any] = {}
    model_types: dict[str, str] = {}

    def add(cls: type) -> None:
        if cls.__name__ in classes:
            return
        defaults, types = {}, {}
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                continue
            try:
                json.dumps(value)
            except TypeError:
                continue
            defaults[field.name] = value
            types[field.name] = str(field.type) if not isinstance(field.type, type) else field.type.__name__
        subs = {}
        classes[cls.__name__] = {"model_type": cls.model_type, "defaults": defaults, "types": types,
                                 "attribute_map": dict(cls.attribute_map), "sub_configs": subs}  # fmt: skip
        if getattr(cls, "model_type", ""):
            model_types.setdefault(cls.model_type, cls.__name__)
        for key, spec in (cls.sub_configs_defaults or {}).items():
            is_auto = not issubclass(spec.config_class, transformers.PreTrainedConfig)
            subs[key] = {
                "config_class": "auto" if is_auto else spec.config_class.__name__,
                "model_type": spec.model_type,
                "init_kwargs": dict(spec.init_kwargs or {}),
                "optional": bool(spec.optional),
            }
            add(CONFIG_MAPPING[spec.model_type] if is_auto else spec.config_class)

    for model_type in sorted(set(SUPPORTED_MODEL_TYPES) | extra):
        add(CONFIG_MAPPING[model_type])
        model_types[model_type] = CONFIG_MAPPING[model_type].__name__
    return {"transformers": transformers.__version__, "model_types": model_types, "classes": classes}


def move_flat_fields(raw: dict[str, Any], sub_key: str) -> dict[str, Any]:
    """``raw`` with the top-level fields of its ``sub_key`` class moved into ``sub_key`` (plus the rope fields),
    as transformers does for composite configs saved flat; unchanged when ``sub_key`` is present or unknown."""
    snapshot = stored_snapshot()
    class_name = snapshot["model_types"].get(raw.get("model_type", ""))
    sub = snapshot["classes"].get(class_name, {}).get("sub_configs", {}).get(sub_key) if class_name else None
    if raw.get(sub_key) is not None or sub is None or sub["config_class"] == "auto":
        return raw
    fields = set(snapshot["classes"][sub["config_class"]]["types"]) | {"rope_parameters", "rope_scaling", "rope_theta"}
    fields.discard("model_type")
    moved = {k: v for k, v in raw.items() if k in fields}
    return {**{k: v for k, v in raw.items() if k not in moved}, sub_key: moved}
