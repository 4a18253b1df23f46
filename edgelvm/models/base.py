"""The adapter seam (torch side): what a model family must tell the rest of edgelvm.

An adapter wraps a loaded Hugging Face model and its processor and answers, for its family: where the vision
tower / projector / language model / embedding / LM head are, how images become pixel inputs and image tokens,
how positions are computed, and the KV-cache geometry. Export, prune, quantize and eval use only this interface.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgelvm.errors import ExportError, UnsupportedModelError
from edgelvm.manifest import KVCacheSpec, PreprocessSpec, TokenizerSpec
from edgelvm.models.checkpoint.activations import install_checkpoint_quantizers
from edgelvm.models.checkpoint.pruned import is_pruned, load_pruned
from edgelvm.models.param_counts import ParameterCounts

log = logging.getLogger(__name__)

#: PIL resampling filter ids (``PIL.Image.Resampling``) to names; the runtime maps names back.
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass
class AttentionBlock:
    """One attention block: query/key/value projections produce ``heads`` / ``kv_heads`` x ``head_dim`` features
    (head-major), ``o`` reads the concatenated heads."""

    side: str  # "vision" | "text"
    layer: int
    module: Any  # the attention module (its attributes may need patching)
    q: Any
    k: Any
    v: Any
    o: Any
    heads: int
    kv_heads: int
    head_dim: int


def qkvo_attention_blocks(side: str, layers: Any, out: str = "o_proj") -> list[AttentionBlock]:
    """Attention blocks of a layer stack whose ``self_attn`` has separate q/k/v projections and an output projection
    named ``out`` (Llama / Qwen2 text models: ``o_proj``; CLIP / SigLIP towers: ``out_proj``)."""
    blocks = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        head_dim = int(attn.head_dim)
        heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        blocks.append(AttentionBlock(side, i, attn, attn.q_proj, attn.k_proj, attn.v_proj, getattr(attn, out), heads,
                                     kv_heads, head_dim))  # fmt: skip
    return blocks


@dataclass
class MLPBlock:
    side: str
    layer: int
    up: list[Any]  # layers whose output rows are the intermediate neurons (gate + up, or fc1)
    down: Any  # the layer whose input columns are the intermediate neurons (down_proj, or fc2)


@dataclass
class ScaleGroup:
    """Linear layers that read one tensor, and the op producing it, which can absorb a per-channel scale exactly
    (AWQ / SmoothQuant move quantization difficulty between the two)."""

    producer: Any  # the module whose output the linears read
    producer_kind: str  # "norm": scale its weight (and bias); "linear": scale its output rows (and bias)
    linears: dict[str, Any]  # "layers.{i}.<path>" -> nn.Linear


class VLMAdapter(ABC):
    """One family's knowledge. Subclasses set ``family`` and ``model_types`` and implement the abstract methods."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    #: Text-model ``model_type``s whose decoder layers, cache and masking have been parity-tested.
    supported_text_models: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: Any, processor: Any, source: str = "") -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self._check_text_model()

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str, *, dtype: str = "float32") -> VLMAdapter:
        import torch
        from transformers import AutoModelForImageTextToText
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # edgelvm shows its own progress

        _require_processor_files(source)
        torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        if is_pruned(source):  # shapes no transformers config can describe: see edgelvm.models.checkpoint.pruned
            adapter = load_pruned(cls, source, torch_dtype)
        else:
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype).eval()
            adapter = cls(model, cls.load_processor(source), source=source)
        install_checkpoint_quantizers(adapter)  # W8A8 checkpoints: the A8 half (what their INT8 graphs compute)
        return adapter

    @classmethod
    def for_config(cls, config: Any, source: str = "") -> VLMAdapter:
        """An adapter over a transformers config alone (no model, no processor, no weights): enough for the
        config-only methods (:meth:`config_parameter_counts`, :meth:`kv_cache_spec`, :meth:`max_positions`) that
        ``edgelvm plan`` and the fit check before loading use. The text-model check runs; checks that need the
        processor wait for the real load."""
        from types import SimpleNamespace

        adapter = cls.__new__(cls)
        adapter.model, adapter.processor, adapter.source = SimpleNamespace(config=config), None, source
        VLMAdapter._check_text_model(adapter)
        return adapter

    @classmethod
    def plain_config_layout(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """config.json as transformers' config class would lay it out, for the torch-free reader
        (:mod:`edgelvm.models.config_json`); families whose hub configs use an older layout override this."""
        return raw

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """The checkpoint's processor (``AutoProcessor``); a family whose processor needs more than this machine
        has (e.g. torchvision for a video part it does not use) may build it from its parts instead."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source)

    def _check_text_model(self) -> None:
        text_type = self.text_config.model_type
        if self.supported_text_models and text_type not in self.supported_text_models:
            raise UnsupportedModelError(
                f"{self.family} with a {text_type!r} language model is not supported; supported text models: "
                f"{', '.join(self.supported_text_models)}",
                where=self.source or None,
                fix="use a checkpoint whose text_config.model_type is one of those",
            )

    # ---- structure ----------------------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config(decoder=True)

    @abstractmethod
    def vision_encoder(self) -> Any:
        """A module ``pixel_values [N, 3, H, W] -> image features [N, T, E]`` already in the LLM's embedding space."""

    @abstractmethod
    def language_model(self) -> Any:
        """The base decoder: takes ``inputs_embeds, attention_mask, position_ids, cache``; returns hidden states."""

    @abstractmethod
    def lm_head(self) -> Any:
        """Hidden state -> vocabulary logits."""

    @abstractmethod
    def input_embeddings(self) -> Any:
        """The token embedding (``nn.Embedding``)."""

    @abstractmethod
    def tokens_per_image(self) -> int:
        """How many placeholder tokens (and feature vectors) one vision-encoder input yields: a whole image, or with
        tiling one view of it (the image's count then depends on its size: ``preprocess_spec().tiling_params``)."""

    @abstractmethod
    def example_pixel_values(self, batch: int) -> Any:
        """Random pixel inputs of the right shape, for tracing and parity checks."""

    def vision_inputs(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The vision encoder's keyword inputs for a processor batch, one dict per encoder call (quantize runs the
        encoder on calibration data with them). Default: the pixel values as ``[N, 3, H, W]`` views; tiled
        processors batch ``[B, views, 3, H, W]`` with the missing views of smaller grids zero-padded, which are
        dropped."""
        pixels = batch.get("pixel_values")
        if pixels is None:
            return []
        if pixels.dim() > 4:
            pixels = pixels.flatten(0, pixels.dim() - 4)
            pixels = pixels[pixels.abs().amax(dim=(1, 2, 3)) > 0]
        return [{"pixel_values": pixels}]

    def example_vision_inputs(self, batch: int) -> dict[str, Any]:
        """Random inputs of the vision encoder by name, for tracing and parity checks (the graph's input names, in
        the encoder's argument order)."""
        return {"pixel_values": self.example_pixel_values(batch)}

    def vision_input_dims(self) -> dict[str, dict[int, str]]:
        """The vision graph's dynamic axes per input: axis -> label (axes with one label share their size)."""
        return {"pixel_values": {0: "batch"}}

    # ---- structure for the compression stages ------------------------------------------------------------------
    def check_stage(self, stage: str, config: Any = None, data: Any = None) -> None:
        """Raise UnsupportedModelError when this family cannot go through ``stage`` (``"quantize"``, ``"distill"``,
        ``"prune"``) with this stage ``config`` and ``data`` (calibration / training data, or None), before the
        stage does any work; default: every stage is possible (its own checks still apply)."""
        return None

    def layer_stacks(self) -> dict[str, Any]:
        """The repeated blocks: ``{"vision": ModuleList, "text": ModuleList}`` (distill maps student layers to
        teacher layers through these; prune walks them)."""
        raise UnsupportedModelError(f"{self.family} does not describe its layer stacks", fix="use a LLaVA checkpoint")

    def image_feature_module(self) -> Any:
        """The module whose output is the image features in the LLM's embedding space (the projector)."""
        raise UnsupportedModelError(f"{self.family} does not name its projector", fix="use a LLaVA checkpoint")

    def attention_blocks(self) -> list[AttentionBlock]:
        """Every attention block of both towers, with its projections and head geometry (for pruning)."""
        raise UnsupportedModelError(f"{self.family} does not describe its attention", fix="use a LLaVA checkpoint")

    def mlp_blocks(self) -> list[MLPBlock]:
        """Every MLP block of both towers: the layers that produce the intermediate neurons and the one that reads
        them (for pruning)."""
        raise UnsupportedModelError(f"{self.family} does not describe its MLPs", fix="use a LLaVA checkpoint")

    def text_scale_groups(self) -> list[ScaleGroup]:
        """The language model's linear layers grouped by the tensor they read, with its producer (for AWQ)."""
        raise UnsupportedModelError(f"{self.family} does not describe its scale groups", fix="use --llm rtn or gptq")

    def sub_configs(self, config: Any | None = None) -> dict[str, Any]:
        """``{"vision": ..., "text": ...}`` sub-configs of ``config`` (default: this model's): the objects a derived
        student's sizes are set on."""
        raise UnsupportedModelError(f"{self.family} does not expose its sub-configs", fix="use a LLaVA checkpoint")

    # ---- sizes for the fit check -------------------------------------------------------------------------------
    def parameter_counts(self) -> ParameterCounts:
        """Parameters of the loaded graphs' modules: the vision encoder, and the language model + LM head without
        the embedding table (memory-mapped by the runtime) unless the head's weight is that table."""

        def count(modules: list[Any]) -> int:
            return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())

        embedding = self.input_embeddings().weight
        lm_head = self.lm_head()
        decoder = count([self.language_model(), lm_head])
        if lm_head.weight is not embedding:
            decoder -= embedding.numel()
        return ParameterCounts(vision=count([self.vision_encoder()]), decoder=decoder)

    def config_parameter_counts(self) -> ParameterCounts:
        """:meth:`parameter_counts` from the config alone (an adapter from :meth:`for_config`), equal to the loaded
        model's. Families override this with arithmetic (``edgelvm/models/param_counts.py``); the default builds
        the model on the ``meta`` device (no memory, no weights read, but torch modules are built: slower)."""
        import torch
        from transformers import AutoModelForImageTextToText

        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(self.config)
        shadow = type(self).__new__(type(self))
        shadow.model, shadow.processor, shadow.source = model, None, self.source
        return shadow.parameter_counts()

    # ---- plain-data descriptions for the bundle ----------------------------------------------------------------
    def kv_cache_spec(self, max_length: int, dtype: str) -> KVCacheSpec:
        cfg = self.text_config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return KVCacheSpec(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=dtype,
            max_length=max_length,
        )

    def kv_windows(self) -> list[int | None] | None:
        """Each key/value layer's sliding window when some layers keep a window-sized cache past it (None: global
        layer), whatever ``max_length`` is: the fit check counts those layers at ``min(max_length, window)``. None
        when every layer keeps the whole context."""
        return None

    def decoder_weights(self, max_length: int) -> Any:
        """The language model as plain weights (:class:`~edgelvm.models.llama_family.DecoderWeights`) for the fused
        ONNX Runtime decoder; families whose text model has no such description raise UnsupportedModelError."""
        raise UnsupportedModelError(f"no fused decoder for {self.family}", fix="export with --decoder portable")

    def decoder_module(self) -> Any:
        """The torch module the decoder graphs are traced from and checked against: ``(inputs_embeds,
        attention_mask [batch, past + seq], position_ids, *past) -> (last logits, *present)``
        (:class:`~edgelvm.models.export_wrappers.DecoderForExport`), with the language model at ``.language_model``
        (graph rewrites find its layers by that prefix). A family whose decoder masks or offsets positions differently
        returns its own module with that interface; the manifest says so as data (:meth:`attention_kind`)."""
        from edgelvm.models.export_wrappers import DecoderForExport

        return DecoderForExport(self.language_model(), self.lm_head(), self.text_config).eval()

    def decoder_example_inputs(self, batch: int, seq: int, dtype: Any) -> dict[str, Any]:
        """Random values of the decoder module's inputs between ``position_ids`` and the past tensors, by name (the
        graph's input names, in the module's argument order), for a step of ``seq`` tokens; default none. A family
        whose decoder reads more every step (cross-attention image states and mask) returns them."""
        return {}

    def decoder_input_dims(self) -> dict[str, dict[int, str]]:
        """The dynamic axes of :meth:`decoder_example_inputs` per input: axis -> label (``batch`` and ``seq`` are
        the decoder's own; other labels are new dims shared by the inputs that name them)."""
        return {}

    def attention_kind(self) -> str:
        """How the decoder graph masks one step's tokens (``Manifest.attention``): ``causal``, or ``prefix_lm``."""
        return "causal"

    def max_positions(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 4096))

    def positions_spec(self) -> dict[str, Any]:
        """Plain 1-D positions (``cumsum(attention_mask) - 1``); M-RoPE families override. A spec with ``rows``
        makes the decoder graph take ``position_ids [rows, batch, seq]`` (else ``[batch, seq]``)."""
        return {"kind": "1d"}

    def image_token(self) -> tuple[str, int]:
        tokenizer = self.processor.tokenizer
        token = getattr(self.processor, "image_token", None) or "<image>"
        return token, int(tokenizer.convert_tokens_to_ids(token))

    def preprocess_spec(self) -> PreprocessSpec:
        token, token_id = self.image_token()
        return preprocess_spec_from_image_processor(
            self.processor.image_processor, image_token=token, image_token_id=token_id, tokens=self.tokens_per_image()
        )

    def bundle_arrays(self) -> dict[str, Any]:
        """Arrays besides the graphs that the runtime needs (file name -> numpy array, saved as ``.npy`` in the
        bundle and hashed with it), e.g. a learned separator vector the runtime inserts between image features.
        The manifest section that uses one names its file."""
        return {}

    def bundle_tokenizers(self) -> dict[str, Any]:
        """Tokenizers besides the language model's that the runtime needs (file name -> a transformers fast
        tokenizer, saved as ``tokenizer.json``-format files in the bundle), e.g. a Q-Former's own tokenizer. The
        manifest section that uses one names its file."""
        return {}

    def conversation_template(self) -> str | None:
        """The chat template that renders records (conversations) into model text for the stages that train or
        calibrate on them (``processor.apply_chat_template(..., chat_template=this)``: calibration, distillation
        and prune-recovery batches, the eval stage's Hugging Face answerer): the checkpoint's own, kept by its
        processor or its tokenizer. A family whose checkpoints ship none returns how the family is prompted. It is
        passed per call and never set on the processor, so a stage's output checkpoint keeps the source's
        processor files (no template is added)."""
        template = getattr(self.processor, "chat_template", None)
        return template or getattr(self.processor.tokenizer, "chat_template", None) or None

    def patches_per_image(self) -> int:
        """Vision-tower tokens per encoder input, for the prune report's FLOPs: ``(image / patch)² + 1`` (CLS) from
        the vision sub-config; sizes may be (h, w) pairs (square tiles use one side)."""
        vc = self.sub_configs()["vision"]
        image, patch = (v[0] if isinstance(v, (list, tuple)) else v for v in (vc.image_size, vc.patch_size))
        return (image // patch) ** 2 + 1

    def tokenizer_spec(self, file: str) -> TokenizerSpec:
        tokenizer = self.processor.tokenizer
        template = getattr(self.processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the runtime renders the default one
            template = template.get("default") or next(iter(template.values()))
        specials = {name: str(value) for name, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
        return TokenizerSpec(
            file=file,
            chat_template=template,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            pad_token=tokenizer.pad_token,
            special_tokens=specials,
            add_special_tokens=True,
        )

    def generation_spec(self) -> dict[str, Any]:
        """EOS ids (a list: chat models often stop on several), pad id, and the checkpoint's default sampling."""
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = self.text_config.eos_token_id
        eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        tokenizer = self.processor.tokenizer
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(int(tokenizer.eos_token_id))
        pad = getattr(gen, "pad_token_id", None)
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        return {"eos_token_ids": eos_ids, "pad_token_id": int(pad)}


def preprocess_spec_from_image_processor(
    image_processor: Any, *, image_token: str, image_token_id: int, tokens: int
) -> PreprocessSpec:
    """Describe a resize → center-crop → rescale → normalize image processor (CLIP, SigLIP and kin) as data."""
    size = dict(getattr(image_processor, "size", None) or {})
    size = {k: int(v) for k, v in size.items() if v is not None}
    if not getattr(image_processor, "do_resize", True):
        mode = "none"
    elif "shortest_edge" in size and "longest_edge" not in size:
        mode = "shortest_edge"
    elif "height" in size and "width" in size:
        mode = "exact"
    else:
        raise ExportError(
            f"image processor size {size} is not a supported resize rule (shortest_edge, or height+width)",
            where=type(image_processor).__name__,
            fix="this family's adapter needs its own preprocessing rule",
        )
    crop = None
    if getattr(image_processor, "do_center_crop", False):
        crop_size = dict(image_processor.crop_size)
        crop = {"height": int(crop_size["height"]), "width": int(crop_size["width"])}
    resample = getattr(image_processor, "resample", 2)
    resample_id = int(getattr(resample, "value", resample))
    do_rescale = getattr(image_processor, "do_rescale", True)
    do_normalize = getattr(image_processor, "do_normalize", True)

    def floats(values: Any) -> list[float]:
        return [float(v) for v in (values if isinstance(values, (list, tuple)) else [values] * 3)]

    return PreprocessSpec(
        resize_mode=mode,
        size=size,
        resample=_RESAMPLE_NAMES.get(resample_id, "bilinear"),
        center_crop=crop,
        rescale_factor=float(image_processor.rescale_factor) if do_rescale else None,
        mean=floats(image_processor.image_mean) if do_normalize else None,
        std=floats(image_processor.image_std) if do_normalize else None,
        convert_rgb=bool(getattr(image_processor, "do_convert_rgb", True)),
        image_token=image_token,
        image_token_id=image_token_id,
        tokens_per_image=tokens,
    )


def _require_processor_files(source: str) -> None:
    """A local checkpoint without tokenizer / image-processor files cannot make a self-describing bundle."""
    path = Path(source)
    if not path.is_dir():
        return
    has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    has_image_processor = any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json"))
    missing = [
        n for n, ok in (("tokenizer.json", has_tokenizer), ("preprocessor_config.json", has_image_processor)) if not ok
    ]
    if missing:
        raise ExportError(
            f"processor files missing: {', '.join(missing)}",
            where=path,
            fix="save the processor next to the model: `AutoProcessor.from_pretrained(orig).save_pretrained(dir)`",
        )
