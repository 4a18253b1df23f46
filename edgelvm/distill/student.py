"""Students: derived from the teacher (fewer layers, narrower widths, initialised from its weights) or loaded.

Why derive: a student that starts from the teacher's own weights (the Minitron recipe: prune depth and width, then
distil) recovers in a fraction of the steps a random student needs. The derivation keeps every attention head's
``head_dim`` (narrowing removes whole heads, so RoPE and the fused decoder keep their shapes) and the teacher's GQA
group size, and copies the *leading* slice of every teacher tensor into the student: leading hidden channels,
leading heads (and with them their own KV heads), leading MLP neurons. Choosing *which* channels to keep by
importance is the prune stage's job; a pruned checkpoint is itself a valid student (``--student PRUNED_DIR``).
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edgelvm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentSpec:
    """Sizes of a derived student; ``None`` keeps the teacher's value."""

    text_layers: int | None = None
    text_hidden: int | None = None
    text_intermediate: int | None = None
    vision_layers: int | None = None
    vision_hidden: int | None = None
    vision_intermediate: int | None = None

    @classmethod
    def parse(cls, text: str) -> StudentSpec:
        """``"text_layers=2,text_hidden=128"`` (the CLI's ``--derive``)."""
        names = {f.name for f in fields(cls)}
        values: dict[str, int] = {}
        for item in filter(None, (x.strip() for x in text.split(","))):
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in names or not value.strip().isdigit() or int(value) < 1:
                raise ConfigError(
                    f"bad student size {item!r}",
                    where="--derive",
                    fix=f"write name=positive integer pairs separated by commas; names: {', '.join(sorted(names))}",
                )
            values[key] = int(value)
        return cls(**values)

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    """Which teacher layers initialise the student's: first and last kept, the rest spread evenly."""
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def derive_config(adapter: Any, spec: StudentSpec) -> tuple[Any, dict[str, list[int]]]:
    """The student's config (a deep copy of the teacher's with ``spec`` applied) and its layer maps."""
    config = copy.deepcopy(adapter.config)
    subs = adapter.sub_configs(config)
    maps: dict[str, list[int]] = {}
    for side in ("text", "vision"):
        sub = subs[side]
        layers = getattr(spec, f"{side}_layers") or sub.num_hidden_layers
        hidden = getattr(spec, f"{side}_hidden") or sub.hidden_size
        inter = getattr(spec, f"{side}_intermediate") or sub.intermediate_size
        for name, value, teacher_value in (
            ("layers", layers, sub.num_hidden_layers),
            ("hidden", hidden, sub.hidden_size),
            ("intermediate", inter, sub.intermediate_size),
        ):
            if value > teacher_value:
                raise ConfigError(
                    f"student {side}_{name}={value} is larger than the teacher's {teacher_value}",
                    where="--derive",
                    fix=f"use {side}_{name} <= {teacher_value}, or pass a student config file for a different shape",
                )
        heads = sub.num_attention_heads
        head_dim = getattr(sub, "head_dim", None) or sub.hidden_size // heads
        if hidden % head_dim:
            valid = ", ".join(str(head_dim * k) for k in range(1, heads + 1))
            raise ConfigError(
                f"student {side}_hidden={hidden} is not a whole number of {head_dim}-wide heads",
                where="--derive",
                fix=f"use one of {valid} (heads keep the teacher's head_dim)",
            )
        new_heads = hidden // head_dim
        kv = getattr(sub, "num_key_value_heads", None)
        if kv is not None:
            group = heads // kv
            if new_heads % group:
                valid = ", ".join(str(head_dim * group * k) for k in range(1, kv + 1))
                raise ConfigError(
                    f"student {side}_hidden={hidden} gives {new_heads} query heads, not a multiple of the teacher's "
                    f"GQA group of {group}",
                    where="--derive",
                    fix=f"use one of {valid}",
                )
            sub.num_key_value_heads = new_heads // group
        if side == "text":
            sub.head_dim = head_dim  # explicit, so a reload never re-derives it from hidden / heads
        maps[side] = evenly_spaced(sub.num_hidden_layers, layers)
        per_layer = getattr(sub, "layer_types", None)  # e.g. Qwen2's full/sliding attention per layer
        if isinstance(per_layer, list) and len(per_layer) == sub.num_hidden_layers:
            sub.layer_types = [per_layer[i] for i in maps[side]]
        sub.num_hidden_layers, sub.hidden_size, sub.intermediate_size = layers, hidden, inter
        sub.num_attention_heads = new_heads
    _check_feature_layer(config, subs["vision"].num_hidden_layers)
    return config, maps


def _check_feature_layer(config: Any, vision_layers: int) -> None:
    layer = getattr(config, "vision_feature_layer", -1)
    for index in [layer] if isinstance(layer, int) else list(layer):
        if not -(vision_layers + 1) <= index <= vision_layers:
            raise ConfigError(
                f"vision_feature_layer {index} does not exist in a {vision_layers}-layer student tower",
                where="--derive",
                fix="keep more vision layers, or use a negative vision_feature_layer in the teacher's config",
            )


def derive_student(adapter: Any, spec: StudentSpec) -> tuple[Any, dict[str, list[int]]]:
    """Build the derived student and initialise it from the teacher; returns (model, layer maps)."""
    import torch

    config, maps = derive_config(adapter, spec)
    student = type(adapter.model)(config)
    student.generation_config = copy.deepcopy(adapter.model.generation_config)
    copied = init_from_teacher(student, adapter, maps)
    log.info("derived student: %s; %d tensors initialised from the teacher", spec.to_dict(), copied)
    return student.to(torch.float32).eval(), maps


def _stack_prefixes(model: Any, stacks: dict[str, Any]) -> dict[str, str]:
    names = {id(module): name for name, module in model.named_modules()}
    return {side: names[id(stack)] + "." for side, stack in stacks.items()}


def init_from_teacher(student: Any, adapter: Any, maps: dict[str, list[int]]) -> int:
    """Copy the leading slice of each teacher tensor into the student tensor of the same name (layer ``i`` of a
    stack reads teacher layer ``maps[stack][i]``). Returns how many tensors were copied."""
    import torch

    from edgelvm.models.registry import adapter_for_model_type

    teacher_state = adapter.model.state_dict()
    student_adapter = adapter_for_model_type(student.config.model_type)(student, adapter.processor)
    t_prefix = _stack_prefixes(adapter.model, adapter.layer_stacks())
    s_prefix = _stack_prefixes(student, student_adapter.layer_stacks())
    copied = 0
    with torch.no_grad():
        for name, param in student.state_dict().items():
            source = name
            for side, prefix in s_prefix.items():
                if name.startswith(prefix):
                    m = re.match(r"(\d+)\.(.*)", name[len(prefix) :])
                    if m:
                        source = f"{t_prefix[side]}{maps[side][int(m.group(1))]}.{m.group(2)}"
            t = teacher_state.get(source)
            if t is None or t.ndim != param.ndim:
                log.debug("student tensor %s has no teacher counterpart; left at its initialisation", name)
                continue
            region = tuple(slice(0, min(a, b)) for a, b in zip(param.shape, t.shape))
            param[region].copy_(t[region].to(param.dtype))
            copied += 1
    return copied


def load_student(source: str | Path, teacher: Any | None) -> Any:
    """A student from a checkpoint directory (weights + processor) or a bare ``config.json`` (random init, the
    teacher's processor). Its family must be supported and its tokenizer must equal the teacher's."""
    import torch

    from edgelvm.models.registry import adapter_for_model_type, read_model_type

    path = Path(source)
    config_file = path if path.is_file() else path / "config.json"
    model_type = read_model_type(config_file.parent if config_file.name == "config.json" else path)
    adapter_cls = adapter_for_model_type(model_type, where=config_file)
    if path.is_dir() and any(path.glob("*.safetensors")):
        student = adapter_cls.from_pretrained(str(path))
        if teacher is not None:  # None: the teacher is an API (its tokenizer is checked where KD needs it)
            check_same_tokenizer(teacher.processor.tokenizer, student.processor.tokenizer, path)
        return student
    if teacher is None:
        raise ConfigError(
            "a student from a bare config needs a local teacher checkpoint for its processor",
            where=config_file,
            fix="give a student checkpoint directory (weights and processor files)",
        )
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(config_file.parent if path.is_dir() else path))
    vocab = config.get_text_config(decoder=True).vocab_size
    teacher_vocab = teacher.text_config.vocab_size
    if vocab != teacher_vocab:
        raise ConfigError(
            f"the student's vocab_size {vocab} differs from the teacher's {teacher_vocab}",
            where=config_file,
            fix="distillation compares logits token by token: give the student the teacher's tokenizer and vocab_size",
        )
    model = AutoModelForImageTextToText.from_config(config).to(torch.float32).eval()
    model.generation_config = copy.deepcopy(teacher.model.generation_config)
    return adapter_cls(model, teacher.processor, source=str(config_file))


def check_same_tokenizer(teacher_tok: Any, student_tok: Any, where: str | Path) -> None:
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        diff = f"{len(t_vocab)} vs {len(s_vocab)} tokens; only in the teacher: {only_t}; only in the student: {only_s}"
        if not only_t and not only_s:
            diff = "the same tokens carry different ids"
        raise ConfigError(
            f"the student's tokenizer differs from the teacher's ({diff})",
            where=where,
            fix="distillation compares logits token by token: use a student built on the teacher's tokenizer",
        )
