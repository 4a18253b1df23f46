"""One typed config per quantization method, each with only its own knobs (torchao's ``Int4WeightOnlyConfig``).

A config names *what* to do to one part of the model (``part``: the language model or the vision encoder); the
handler registered for its type (:mod:`edgelvm.quantize.handlers`) does it. :func:`method_config` builds one from
a name and knobs — the CLI's path — and refuses a name that matches no method and a knob the method does not take,
instead of ignoring it. Importing a config loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from edgelvm.calibration.observers import OBSERVERS, check_observer
from edgelvm.errors import ConfigError
from edgelvm.quantize.int4 import check_block_size


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. ``name``: what the CLI and the checkpoint record call it; ``part``: ``"llm"``
    or ``"vision"`` (one method per part in one run); ``needs_calibration``: False for data-free methods."""

    name: ClassVar[str] = ""
    part: ClassVar[str] = "llm"
    needs_calibration: ClassVar[bool] = True


#: ``lm_head`` values: the LM head kept in float, or block-wise (the layers' ``group_size``) INT8 / INT4 codes.
LM_HEAD_FORMATS = ("float", "int8", "int4")
#: ``embeddings`` values: the token table kept in float, or INT8 with one scale per row (gathered by the runtime).
EMBEDDING_FORMATS = ("float", "int8")
#: Below this top-1 agreement with the float head on the calibration answers, a quantized LM head is a warning.
LM_HEAD_MIN_AGREEMENT = 0.98


@dataclass(frozen=True)
class Int4Config(MethodConfig):
    """INT4 weight-only, block-wise along the input dimension (the language model's linears).

    ``lm_head``: at decode the head is most of the bytes read per token once the layers are INT4 (113 of 175 MB
    on a SmolLM2-135M shape), so it can be INT8 or INT4 too — measured by top-1 agreement with the float head on the
    calibration answers. ``embeddings``: the token table stored INT8 per row (only the bundle's size and the
    runtime's resident pages change; a tied head shares the table, so it then computes with those values)."""

    group_size: int = 128
    symmetric: bool = True  # False: zero points (TensorRT takes symmetric only)
    lm_head: str = "float"
    embeddings: str = "float"

    def __post_init__(self) -> None:
        check_block_size(self.group_size)
        for knob, value, allowed in (("lm-head", self.lm_head, LM_HEAD_FORMATS),
                                     ("embeddings", self.embeddings, EMBEDDING_FORMATS)):  # fmt: skip
            if value not in allowed:
                raise ConfigError(f"--{knob} {value!r} is not a format", where=f"--{knob}",
                                  fix=f"use one of {', '.join(allowed)}")  # fmt: skip

    @property
    def lm_head_bits(self) -> int | None:
        return None if self.lm_head == "float" else int(self.lm_head.removeprefix("int"))


@dataclass(frozen=True)
class RTNConfig(Int4Config):
    """Round to nearest: no data needed (with calibration data the report still measures each layer's error)."""

    name: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False


@dataclass(frozen=True)
class AWQConfig(Int4Config):
    """Activation-aware per-channel scales (folded into the producing norms), then per-block clipping."""

    name: ClassVar[str] = "awq"
    clip: bool = True  # search each block's clipping range (q/k are never clipped)


@dataclass(frozen=True)
class GPTQConfig(Int4Config):
    """Second-order error compensation column by column, from the calibration Gram matrix."""

    name: ClassVar[str] = "gptq"
    damp: float = 0.01  # Hessian damping, a fraction of its mean diagonal
    act_order: bool = True  # columns by decreasing Hessian diagonal

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"gptq damp {self.damp} not in (0, 1)", where="--gptq-damp", fix="use e.g. 0.01")


@dataclass(frozen=True)
class SmoothQuantConfig(MethodConfig):
    """W8A8 language model: activation outliers moved into the weights (portable decoder only)."""

    name: ClassVar[str] = "smoothquant"
    alpha: float = 0.5  # migration strength

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"smoothquant alpha {self.alpha} not in (0, 1)", where="--smoothquant-alpha",
                              fix="use e.g. 0.5 (the paper's default for most models)")  # fmt: skip


@dataclass(frozen=True)
class ObserverSweep:
    """Try each observer in ``candidates`` and keep the best: by feature cosine against fp32 on the calibration
    images, or — given ``eval_data`` (loaded records or a :class:`~edgelvm.calibration.dataset.CalibrationSet`,
    never a path: the caller loads it) — by teacher-forced answer-token accuracy on it."""

    candidates: tuple[str, ...] = OBSERVERS
    eval_data: Any = None

    def __post_init__(self) -> None:
        for name in self.candidates:
            check_observer(name)
        if not self.candidates or "auto" in self.candidates:
            raise ConfigError("an observer sweep needs named candidates", where="ObserverSweep.candidates",
                              fix=f"use some of {', '.join(OBSERVERS)}")  # fmt: skip


@dataclass(frozen=True)
class Int8VisionConfig(MethodConfig):
    """W8A8 vision encoder + projector: per-channel weights, per-tensor input ranges from ``observer`` — a named
    observer (``"minmax"``, ``"percentile:99.99"``, ``"entropy"``, ``"mse"``) or an :class:`ObserverSweep`."""

    name: ClassVar[str] = "int8"
    part: ClassVar[str] = "vision"
    observer: str | ObserverSweep = field(default_factory=ObserverSweep)

    def __post_init__(self) -> None:
        if isinstance(self.observer, str):
            check_observer(self.observer)
            if self.observer == "auto":
                object.__setattr__(self, "observer", ObserverSweep())
        elif not isinstance(self.observer, ObserverSweep):
            raise ConfigError(
                f"observer {self.observer!r} is neither a name nor an ObserverSweep",
                where="Int8VisionConfig.observer",
                fix="use e.g. 'entropy' or ObserverSweep()",
            )


#: name -> config class, per part: what ``--llm`` / ``--vision`` accept (besides ``none``).
METHODS: dict[str, dict[str, type[MethodConfig]]] = {
    "llm": {c.name: c for c in (AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig)},
    "vision": {c.name: c for c in (Int8VisionConfig,)},
}


def knobs(config_type: type[MethodConfig]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(config_type))


def method_config(part: str, name: str, where: dict[str, str] | None = None, **given: Any) -> MethodConfig | None:
    """The ``part`` method called ``name`` (None for ``"none"``) with the ``given`` knobs. A knob the method does
    not take is an error naming the methods that do; ``where`` maps a knob to the option the user gave it by."""
    where = where or {}
    methods = METHODS.get(part)
    if methods is None:
        raise ConfigError(f"no model part {part!r}", where="method_config", fix=f"use one of {', '.join(METHODS)}")
    if name == "none":
        config_type = None
    elif name in methods:
        config_type = methods[name]
    else:
        raise ConfigError(f"unknown {part} method {name!r}", where=f"--{part}",
                          fix=f"use {', '.join([*methods, 'none'])}")  # fmt: skip
    accepted = knobs(config_type) if config_type is not None else ()
    for knob in given:
        if knob not in accepted:
            users = [n for n, c in methods.items() if knob in knobs(c)]
            raise ConfigError(
                f"{where.get(knob, knob)} is not a knob of --{part} {name} (it would be ignored)",
                where=where.get(knob, knob),
                fix=f"drop it, or use a method that takes it ({', '.join(users) or 'none'})",
            )
    return config_type(**given) if config_type is not None else None
