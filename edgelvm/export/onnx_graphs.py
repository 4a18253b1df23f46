"""Trace the vision encoder and the KV-cache decoder to ONNX (torch.export / dynamo) and check them against PyTorch.

The legacy TorchScript exporter is deprecated and produced invalid graphs for some towers, so only
the dynamo path is used. Every graph is run once in ONNX Runtime on fresh random inputs right after export and
compared with the PyTorch module; the errors go into the manifest and the export fails if they exceed tolerance.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgelvm.errors import ExportError
from edgelvm.export.external_data import ContentIndex, save_npy_aligned, share_external_data
from edgelvm.export.gqa_decoder import build_gqa_decoder
from edgelvm.export.rewrite import GraphRewrite
from edgelvm.manifest import LOGITS_KEEP, WINDOW_POSITIONS, GraphSpec, KVCacheSpec, TensorSpec
from edgelvm.models.base import VLMAdapter
from edgelvm.models.checkpoint.activations import float_activations
from edgelvm.runtime.session_settings import SessionSettings

log = logging.getLogger(__name__)
# torch.onnx warns once per missing torchvision op at WARNING level; irrelevant for VLM graphs.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

OPSET = 20
#: Max relative error (max |onnx - torch| / max |torch|) accepted at export, per precision.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
#: Where the decoder module (``VLMAdapter.decoder_module``) keeps the language model: the module-path prefix of its
#: layers in the traced graph.
DECODER_PREFIX = "language_model."
#: A graph that quantizes activations to int8 (INT8 QDQ vision, MatMulNBits accuracy_level 4) against its float or
#: fake-quantized reference: values at a rounding boundary may land one step apart and propagate.
INT8_ACTIVATION_TOLERANCE = 5e-2
#: Above this, weights go to a side file: ONNX protobufs are capped at 2 GB, and external tensors can be shared
#: between graphs (the fused decoder points into the portable decoder's file: export/external_data.py).
_EXTERNAL_DATA_BYTES = 64 << 20
#: A decoder whose weights exceed this many bytes is checked on a part of the shipped graph instead of whole: the
#: present keys/values of its first :data:`PARTIAL_PARITY_LAYERS` layers, from a sub-graph whose initializers point
#: into the same data files, so ONNX Runtime maps only those layers' bytes. A whole-graph session would map every
#: weight a second time next to the PyTorch model's (issue 19: the 0.8B-class export peaked at 1.9x the checkpoint,
#: mostly those two mappings). Smaller decoders are checked whole (``ExportConfig.parity_whole_bytes``).
PARITY_WHOLE_BYTES = 1 << 30
#: Key/value layers a partial check compares: all but the last of them are checked whole (attention, MLP, norms),
#: the last up to its key/value projections.
PARTIAL_PARITY_LAYERS = 3


@dataclass
class ParityResult:
    max_abs: float
    max_rel: float
    #: What was compared when not the whole graph (the manifest's ``parity.scope``), e.g. "present key/value of
    #: layers 0-2 of 24".
    scope: str | None = None

    def as_dict(self) -> dict[str, float | str]:
        found: dict[str, float | str] = {"max_abs": self.max_abs, "max_rel": self.max_rel}
        if self.scope is not None:
            found["scope"] = self.scope
        return found


def _export(
    module: torch.nn.Module,
    args: tuple,
    dynamic_shapes: Any,
    names_in: list[str],
    names_out: list[str],
    path: Path,
    weight_bytes: int,
) -> None:
    """Run the dynamo exporter quietly (it prints progress to stdout) and save, with external data if large."""
    sink = io.StringIO()
    # the float graph is traced (the rewrite adds the QDQ); a loaded W8A8 checkpoint's quantizers are off meanwhile
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), float_activations(module):
        warnings.simplefilter("ignore")
        try:
            traced: Any = module
            if getattr(module, "export_program_first", False):
                # torch 2.13: the ONNX exporter's own trace of a `scan` with dynamic sizes fails to decompose
                # (SymInt outputs); the program torch.export makes converts. Only modules that ask for it.
                traced = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
            program = torch.onnx.export(
                traced,
                args,
                dynamic_shapes=None if traced is not module else dynamic_shapes,
                input_names=names_in,
                output_names=names_out,
                dynamo=True,
                opset_version=OPSET,
                verbose=False,
            )
        except Exception as err:  # torch.export failures are long; keep the first line and the log
            log.debug("exporter output:\n%s", sink.getvalue())
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(
                f"torch.export could not trace {type(module).__name__}: {first}",
                where=str(path.name),
                fix="run with --verbose for the full exporter log; report the model config if it is a supported family",
            ) from err
        program.save(str(path), external_data=weight_bytes > _EXTERNAL_DATA_BYTES)
    del program  # its folded constants (transposed weights) are a second copy of the graph's weights
    gc.collect()  # the exported program holds reference cycles: free them before the parity session loads the graph
    log.debug("exporter output:\n%s", sink.getvalue())


def _ort_session(path: Path, prepack: bool = True) -> Any:
    """``prepack=False`` for float graphs: a handful of parity runs need no pre-packed copy of every weight next to
    the one the session already holds (quantized kernels keep theirs: their packing is part of what they compute)."""
    from edgelvm.runtime.ort_backend import import_onnxruntime

    ort = import_onnxruntime()  # export checks its graphs with it: a missing install is named, with the fix

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # as the runtime runs it (runtime/session_settings.py): INT4 QDQ matmuls in fp32, not ORT's int8 default; INT8
    # QDQ matmuls without the AVX2 u8s8 kernel's int16 saturation
    SessionSettings(threads=0, spinning=False).apply_numerics(options)
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare(onnx_outputs: list[np.ndarray], torch_outputs: list[torch.Tensor]) -> ParityResult:
    max_abs, scale = 0.0, 0.0
    for got, ref in zip(onnx_outputs, torch_outputs):
        ref_np = ref.detach().float().numpy()
        max_abs = max(max_abs, float(np.abs(got.astype(np.float32) - ref_np).max(initial=0.0)))
        scale = max(scale, float(np.abs(ref_np).max(initial=0.0)))
    return ParityResult(max_abs=max_abs, max_rel=max_abs / max(scale, 1e-12))


def _partial_graph(path: Path, inputs: list[str], outputs: list[str]) -> Path:
    """The part of the saved graph ``path`` that computes ``outputs`` from ``inputs``, saved beside it. Its
    initializers keep pointing into the graph's own external data (nothing is loaded or copied), so a session on it
    maps only their bytes: the shipped weights, not a re-export. The caller removes the file.

    Not ``onnx.utils.Extractor``: it follows only a node's listed inputs, and a ``Scan`` / ``If`` body may read
    values of the outer graph by name (the hybrid decoder's scan does)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
    keep: set[int] = set()
    used: set[str] = set()
    stack, stop = list(outputs), set(inputs)
    while stack:
        name = stack.pop()
        if name in used:
            continue
        used.add(name)
        i = producer.get(name)
        if name not in stop and i is not None and i not in keep:
            keep.add(i)
            stack.extend(_node_reads(graph.node[i]))
    part = helper.make_graph(
        [node for i, node in enumerate(graph.node) if i in keep],  # in the original (topological) order
        f"part of {graph.name}",
        [v for v in graph.input if v.name in stop],
        [v for v in graph.output if v.name in outputs],
        initializer=[t for t in graph.initializer if t.name in used],
        value_info=[v for v in graph.value_info if v.name in used],
    )
    extracted = helper.make_model(part, opset_imports=model.opset_import, functions=model.functions)
    extracted.ir_version = model.ir_version
    target = path.with_name(f".parity.{path.name}")
    onnx.save_model(extracted, str(target))
    return target


def _node_reads(node: Any) -> list[str]:
    """The values a node reads: its inputs and what its subgraphs (loop / branch bodies) read from outside them."""
    reads = [name for name in node.input if name]
    for attr in node.attribute:
        for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
            defined = {v.name for v in body.input} | {t.name for t in body.initializer}
            defined |= {name for inner in body.node for name in inner.output}
            inner_reads = [name for inner in body.node for name in _node_reads(inner)]
            reads += [name for name in [*inner_reads, *(v.name for v in body.output)] if name not in defined]
    return reads


def _graph_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of a saved graph as :func:`_specs` reads them from a session, without opening one
    (which would map every weight)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph

    def convert(values: Any) -> list[TensorSpec]:
        specs = []
        for v in values:
            tensor = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
            specs.append(TensorSpec(name=v.name, dtype=dtype, shape=dims))
        return specs

    return convert(graph.input), convert(graph.output)


def _partial_layers(kv: KVCacheSpec, weight_bytes: int, whole_bytes: int | None) -> int | None:
    """How many key/value layers a partial check compares, or None for a whole-graph check."""
    limit = PARITY_WHOLE_BYTES if whole_bytes is None else whole_bytes
    if weight_bytes <= limit or kv.num_layers <= PARTIAL_PARITY_LAYERS:
        return None
    return PARTIAL_PARITY_LAYERS


def _partial_scope(kv: KVCacheSpec, layers: int, total: int) -> str:
    last = kv.kv_layers[layers - 1]
    states = " and states" if kv.states else ""
    return f"present key/value{states} of layers 0-{last} of {total} (layer {last} up to its key/value projections)"


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bfloat16)": "bfloat16",
    "tensor(uint8)": "uint8",
}


def _specs(session: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    def convert(args: Any) -> list[TensorSpec]:
        return [
            TensorSpec(
                name=a.name,
                dtype=_ORT_TYPES.get(a.type, a.type),
                shape=[d if isinstance(d, (int, str)) else "?" for d in a.shape],
            )
            for a in args
        ]

    # inputs with a default (the decoder's logits_keep, its last input) are listed apart by ONNX Runtime
    return convert([*session.get_inputs(), *session.get_overridable_initializers()]), convert(session.get_outputs())


def _check(
    name: str, parity: ParityResult, precision: str, rewrite: GraphRewrite | None = None, limit: float | None = None
) -> None:
    if limit is None:
        limit = max(TOLERANCE[precision], rewrite.tolerance) if rewrite is not None else TOLERANCE[precision]
    if not np.isfinite(parity.max_rel) or parity.max_rel > limit:
        raise ExportError(
            f"the exported {name} graph disagrees with PyTorch: max relative error {parity.max_rel:.2e} > {limit:.0e}",
            where=name,
            fix="this is a bug in the exporter path for this model; please report it with the model config",
        )


def export_vision(adapter: VLMAdapter, path: Path, precision: str, rewrite: GraphRewrite | None = None) -> GraphSpec:
    """The adapter's vision encoder, e.g. ``pixel_values [batch, C, H, W] -> image_features [batch, tokens, hidden]``,
    with the inputs and dynamic axes the adapter names (:meth:`VLMAdapter.vision_input_dims`).

    ``rewrite`` (e.g. INT8 QDQ) is applied to the traced graph before the parity check, which then compares with the
    module in the rewrite's reference state."""
    module = adapter.vision_encoder()
    example = adapter.example_vision_inputs(2)
    names = list(example)
    dims: dict[str, Any] = {}
    for axes in adapter.vision_input_dims().values():
        for label in axes.values():
            dims.setdefault(label, torch.export.Dim(label, min=1, max=_VISION_DIM_MAX.get(label, 4096)))
    shapes = tuple({axis: dims[label] for axis, label in adapter.vision_input_dims()[n].items()} for n in names)
    args = tuple(example[n] for n in names)
    _export(module, args, shapes, names, ["image_features"], path, _weight_bytes(module))
    if rewrite is not None:
        rewrite.rewrite_file(path, "")

    session = _ort_session(path, prepack=rewrite is not None)
    fresh = adapter.example_vision_inputs(3)
    with torch.no_grad(), _reference(rewrite, module):
        reference = module(*(fresh[n] for n in names))
    got = session.run(None, {n: fresh[n].numpy() for n in names})
    if getattr(module, "reduction", None) is not None:
        # a graph that keeps its top-scoring image tokens (models/token_reduction.py): compared at the tokens it kept
        # when those are a valid top-N, since float rounding may order a near tie the other way
        with torch.no_grad(), _reference(rewrite, module):
            reference = module.align_to_graph(got[0], *(fresh[n] for n in names))
    parity = _compare(got, [reference])
    _check("vision", parity, precision, rewrite)
    inputs, outputs = _specs(session)
    return GraphSpec(file=path.name, precision=rewrite.precision if rewrite else precision, inputs=inputs,
                     outputs=outputs, parity=parity.as_dict())  # fmt: skip


#: Upper bounds of the vision graph's named dynamic axes (others: 4096).
_VISION_DIM_MAX = {"batch": 256}


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _reference(rewrite: GraphRewrite | None, module: torch.nn.Module) -> Any:
    return rewrite.reference_context(module) if rewrite is not None else contextlib.nullcontext()


def _decoder_example(
    adapter: VLMAdapter, kv: KVCacheSpec, batch: int, seq: int, past: int, dtype: torch.dtype, pad_rows: int = 0,
    window_past: int | None = None, keep: int = 1,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The decoder's inputs in graph order. Sliding-window layers (``kv.windows``) get ``window_past`` columns
    (default ``min(past, window - 1)``): the most recent positions before the step, as the runtime keeps them.
    ``keep``: the length of :data:`~edgelvm.manifest.LOGITS_KEEP` (the logits of each row's last ``keep``
    positions)."""
    hidden = adapter.text_config.hidden_size
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    for row in range(min(pad_rows, batch)):
        mask[row, : row + 1] = 0  # left padding of different lengths
    counts = mask.cumsum(-1) - 1
    positions = counts.clamp(min=0)[:, past:]
    rows = adapter.positions_spec().get("rows")
    if rows:  # [rows, batch, seq] (M-RoPE): different per row so that a row mix-up shows in the parity check
        positions = torch.stack([positions + 3 * r for r in range(int(rows))])
    window, local = kv.window, [w is not None for w in kv.windows or []]
    windows: list[torch.Tensor] = []
    kept = past
    if window is not None:
        kept = min(past, window - 1) if window_past is None else window_past
        before = counts[:, past - 1 : past] + 1 if past else torch.zeros(batch, 1, dtype=torch.int64)
        old = before - kept + torch.arange(kept)  # the last `kept` positions of each row before the step
        new = torch.where(mask[:, past:].bool(), counts[:, past:], -1)
        windows = [torch.cat([torch.where(old >= 0, old, -1), new], dim=1)]
    lengths = [kept if local and local[i // 2] else past for i in range(2 * kv.num_layers)]
    tensors = [torch.randn(batch, kv.num_kv_heads, n, kv.head_dim, dtype=dtype) for n in lengths]
    tensors += [0.1 * torch.randn(batch, *s.shape, dtype=_TORCH_DTYPES[s.dtype]) for s in kv.states or []]
    extras = adapter.decoder_example_inputs(batch, seq, dtype).values()  # e.g. cross-attention inputs; usually none
    keep_input = torch.zeros(keep, dtype=torch.int64)  # only its length counts
    return (torch.randn(batch, seq, hidden, dtype=dtype), mask, positions, *extras, *windows, *tensors, keep_input)


def decoder_io_names(kv: KVCacheSpec) -> tuple[list[str], list[str]]:
    past, present = kv.io_names()
    return ["inputs_embeds", "attention_mask", "position_ids", *past, LOGITS_KEEP], ["logits", *present]


def _default_logits_keep(path: Path) -> None:
    """Give the saved graph's :data:`~edgelvm.manifest.LOGITS_KEEP` input a one-element default (an initializer of
    the same name: ONNX Runtime lets a feed override it), so that a caller that does not feed it — an older edgelvm
    runtime, a script — gets each row's last logits ``[batch, vocab]`` as before. TensorRT's ONNX parser takes such
    an input as a constant (engines compute K = 1)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, dtype=np.int64), LOGITS_KEEP))
    onnx.save_model(model, str(path))


def export_decoder(
    adapter: VLMAdapter,
    path: Path,
    precision: str,
    kv: KVCacheSpec,
    rewrite: GraphRewrite | None = None,
    index: ContentIndex | None = None,
    parity_whole_bytes: int | None = None,
) -> GraphSpec:
    """The KV-cache decoder; one graph serves prefill (past_len 0) and decode (seq 1). ``rewrite`` as for the vision
    graph (the module-path prefix of the language model inside the wrapper is ``language_model.``). Weights whose
    bytes ``index`` holds (a tied LM head: the embedding table) point there instead of being stored twice; the
    parity check runs on the graph as it is finally stored — whole, or above ``parity_whole_bytes`` of weights
    (default :data:`PARITY_WHOLE_BYTES`) on its first layers (:func:`_partial_graph`)."""
    module = adapter.decoder_module()
    dtype = next(module.parameters()).dtype
    names_in, names_out = decoder_io_names(kv)
    extra_names = list(adapter.decoder_example_inputs(1, 1, dtype))  # between position_ids and the past tensors
    window, local = kv.window, [w is not None for w in kv.windows or []]
    window_names = [WINDOW_POSITIONS] if window is not None else []  # after the adapter's inputs
    names_in = [*names_in[:3], *extra_names, *window_names, *names_in[3:]]  # logits_keep last

    batch = torch.export.Dim("batch", min=1, max=256)
    seq = torch.export.Dim("seq", min=1, max=kv.max_length)
    past = torch.export.Dim("past", min=1, max=kv.max_length)
    total = torch.export.Dim("total", min=2, max=2 * kv.max_length)
    positions = {1: batch, 2: seq} if adapter.positions_spec().get("rows") else {0: batch, 1: seq}
    labels = {"batch": batch, "seq": seq}
    extra_dims = adapter.decoder_input_dims()
    for axes in extra_dims.values():
        for label in axes.values():
            labels.setdefault(label, torch.export.Dim(label, min=1, max=256))
    extra_shapes = [{axis: labels[label] for axis, label in extra_dims.get(n, {}).items()} for n in extra_names]
    keep = torch.export.Dim("keep", min=1, max=kv.max_length)  # logits of the last `keep` positions of each row
    past_window = torch.export.Dim("past_window", min=1, max=kv.max_length)  # the local layers' kept columns
    window_shapes = [{0: batch, 1: torch.export.Dim("window_total", min=2, max=2 * kv.max_length)}] * len(window_names)
    kv_shapes = [{0: batch, 2: past_window if window is not None and local[i // 2] else past}
                 for i in range(2 * kv.num_layers)]  # fmt: skip
    shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        positions,
        *extra_shapes,
        # the module's variadic arguments: window_positions (when windowed) first, then the past tensors, then
        # logits_keep
        tuple([*window_shapes, *kv_shapes, *({0: batch} for _ in kv.states or []), {0: keep}]),
    )
    # keep 4: not 1 (torch.export would specialise it) and unlike the other example sizes
    example = _decoder_example(adapter, kv, batch=2, seq=5, past=3, dtype=dtype, window_past=6, keep=4)
    weight_bytes = _weight_bytes(module)
    _export(module, example, shapes, names_in, names_out, path, weight_bytes)
    _default_logits_keep(path)
    log.info("decoder: traced and saved")
    if rewrite is not None:
        rewrite.rewrite_file(path, DECODER_PREFIX)
    if index is not None:
        shared = share_external_data(path, index)
        if shared:
            log.info("decoder: %.1f MB of weights shared with files written before it", shared / 1e6)

    partial = _partial_layers(kv, weight_bytes, parity_whole_bytes)
    # which outputs are compared: logits, every key/value and state — or the first `partial` layers' presents
    checked = list(range(len(names_out)))
    scope, graph = None, path
    if partial is not None:
        last = kv.kv_layers[partial - 1]
        states = [1 + 2 * kv.num_layers + j for j, s in enumerate(kv.states or []) if s.layer <= last]
        checked = [*range(1, 1 + 2 * partial), *states]
        scope = _partial_scope(kv, partial, adapter.text_config.num_hidden_layers)
        graph = _partial_graph(path, names_in, [names_out[i] for i in checked])
    log.info("decoder: checking %s against PyTorch", scope or "the whole graph")
    try:
        worst = _decoder_parity(adapter, module, graph, names_in, kv, dtype, rewrite, extra_names, checked)
    finally:
        if graph != path:
            graph.unlink(missing_ok=True)
    worst.scope = scope
    _check("decoder", worst, precision, rewrite)
    inputs, outputs = _graph_specs(path)
    return GraphSpec(file=path.name, precision=rewrite.precision if rewrite else precision, inputs=inputs,
                     outputs=outputs, parity=worst.as_dict())  # fmt: skip


def _decoder_parity(
    adapter: VLMAdapter,
    module: torch.nn.Module,
    graph: Path,
    names_in: list[str],
    kv: KVCacheSpec,
    dtype: torch.dtype,
    rewrite: GraphRewrite | None,
    extra_names: list[str],
    checked: list[int],
) -> ParityResult:
    """The portable decoder's outputs numbered ``checked`` (of logits, presents, states) against the module's, on a
    padded decode step and a prefill (the logits of its last 3 positions: ``logits_keep``); ``graph`` computes
    exactly those outputs, in that order."""
    window, local = kv.window, [w is not None for w in kv.windows or []]
    session = _ort_session(graph, prepack=rewrite is not None)
    worst = ParityResult(0.0, 0.0)
    # Decode step with padding, and a prefill with an empty cache (the runtime's two uses of the graph).
    examples = [
        _decoder_example(adapter, kv, batch=3, seq=1, past=6, dtype=dtype, pad_rows=2),
        _decoder_example(adapter, kv, batch=1, seq=7, past=0, dtype=dtype, keep=3),
    ]
    if window is not None:  # past the window: full local windows, and a step whose later queries see fewer of them
        examples.append(_decoder_example(adapter, kv, batch=2, seq=4, past=window + 2, dtype=dtype, pad_rows=1,
                                         keep=2))  # fmt: skip
    for args in examples:
        with torch.no_grad(), _reference(rewrite, module):
            reference = module(*args)
        got = dict(zip(checked, session.run(None, {n: a.numpy() for n, a in zip(names_in, args)})))
        # Compare logits and the cache rows of real tokens; fully padded query rows are undefined in both.
        parity = ParityResult(0.0, 0.0)
        columns = args[1].bool()  # which key columns hold real tokens (global layers: the attention mask)
        local_columns = args[3 + len(extra_names)] >= 0 if window is not None else columns
        for k, g in got.items():
            r = reference[k]
            if 1 <= k < 1 + 2 * kv.num_layers:  # keys / values: real columns only
                i = k - 1
                valid = (local_columns if window is not None and local[i // 2] else columns)[:, None, :, None]
                valid = valid.expand_as(r)
                parity = _merge(parity, _compare([np.where(valid.numpy(), g, 0)], [torch.where(valid, r, 0)]))
            else:  # logits, fixed-size states
                parity = _merge(parity, _compare([g], [r]))
        worst = _merge(worst, parity)
    return worst


def _merge(a: ParityResult, b: ParityResult) -> ParityResult:
    return ParityResult(max(a.max_abs, b.max_abs), max(a.max_rel, b.max_rel))


def export_fused_decoder(
    adapter: VLMAdapter,
    path: Path,
    kv: KVCacheSpec,
    accuracy_level: int = 0,
    index: ContentIndex | None = None,
    parity_whole_bytes: int | None = None,
) -> GraphSpec:
    """The ONNX Runtime–fused decoder (in-place KV, GroupQueryAttention), checked against the PyTorch decoder on a
    right-padded two-row prompt and a decode step. Weights ``index`` knows are shared, not written again. Above
    ``parity_whole_bytes`` of weights the check compares the first layers' caches after those steps instead of the
    logits, on a part of the graph (as :func:`export_decoder`)."""
    spec = build_gqa_decoder(adapter.decoder_weights(kv.max_length), kv, path, accuracy_level, index)
    module = adapter.decoder_module()
    partial = _partial_layers(kv, _weight_bytes(module), parity_whole_bytes)
    scope, graph = None, path
    if partial is not None:
        scope = _partial_scope(kv, partial, adapter.text_config.num_hidden_layers)
        graph = _partial_graph(path, [t.name for t in spec.inputs], kv.io_names()[1][: 2 * partial])
    log.info("fused decoder: checking %s against PyTorch", scope or "the whole graph")
    try:
        worst = _fused_parity(adapter, module, graph, kv, spec.precision, 2 * partial if partial else None)
    finally:
        if graph != path:
            graph.unlink(missing_ok=True)
    worst.scope = scope
    # accuracy_level 4 quantizes the INT4 matmuls' activations to int8 on purpose: held to the INT8 bound instead
    _check("fused decoder", worst, "fp32", limit=INT8_ACTIVATION_TOLERANCE if accuracy_level else None)
    spec.parity = worst.as_dict()
    return spec


def _fused_parity(
    adapter: VLMAdapter, module: torch.nn.Module, graph: Path, kv: KVCacheSpec, precision: str, caches: int | None
) -> ParityResult:
    """Run the fused ``graph`` on a right-padded two-row prompt and decode steps; compare each step's logits (the
    prompt's last :data:`_FUSED_KEEP` positions per row, then each decode step's) with the module's, or
    (``caches``: a part of the graph without logits) the first ``caches`` present buffers after the last step with
    the module's cache."""
    session = _ort_session(graph, prepack=precision != "fp32")
    hidden = adapter.text_config.hidden_size
    generator = torch.Generator().manual_seed(3)
    lengths, steps = [7, 4], 2
    prompts = [torch.randn(1, n, hidden, generator=generator) for n in lengths]
    tokens = [[torch.randn(1, 1, hidden, generator=generator) for _ in lengths] for _ in range(steps)]
    names = [i.name for i in session.get_inputs()]
    buffers = {
        n: np.zeros((len(lengths), kv.num_kv_heads, kv.max_length, kv.head_dim), np.float32)
        for n in names
        if n.startswith("past")
    }
    worst = ParityResult(0.0, 0.0)
    references = []  # per row: torch logits for the prompt, then each decode step
    final_caches = []  # per row: the module's cache after the last step
    for row, prompt in enumerate(prompts):
        empty = [torch.zeros(1, kv.num_kv_heads, 0, kv.head_dim) for _ in range(2 * kv.num_layers)]
        with torch.no_grad():
            n = prompt.shape[1]
            keep = torch.zeros(_FUSED_KEEP, dtype=torch.int64)  # the logits of the last 3 prompt positions
            out = module(prompt, torch.ones(1, n, dtype=torch.int64), torch.arange(n)[None], *empty, keep)
            row_refs, past = [out[0]], list(out[1:])
            for step in range(steps):
                total = n + step + 1
                out = module(
                    tokens[step][row], torch.ones(1, total, dtype=torch.int64), torch.tensor([[total - 1]]), *past
                )
                row_refs.append(out[0])
                past = list(out[1:])
        references.append(row_refs)
        final_caches.append(past)
    embeds = np.zeros((len(lengths), max(lengths), hidden), np.float32)
    for row, prompt in enumerate(prompts):
        embeds[row, : lengths[row]] = prompt[0].numpy()
    totals = np.array(lengths)
    for step in range(steps + 1):
        seq, keep = embeds.shape[1], _FUSED_KEEP if step == 0 else 1
        # each row's last `keep` real positions, flat in [rows x seq] (right padding: a row ends at its length)
        ends = np.array(lengths) if step == 0 else np.ones(len(lengths), np.int64)
        index = (np.arange(len(lengths)) * seq + ends)[:, None] - keep + np.arange(keep)
        feeds = {
            "inputs_embeds": embeds,
            "seqlens_k": (totals - 1).astype(np.int32),
            "total_sequence_length": np.array(totals.max(), np.int32),
            "logits_index": index.reshape(-1),
        }
        got = _run_in_place(session, feeds, buffers)
        for row in range(len(lengths)):
            if got is not None:
                worst = _merge(worst, _compare([got[row * keep : (row + 1) * keep]], [references[row][step]]))
        if step < steps:
            embeds = np.concatenate([tokens[step][r][0].numpy()[None] for r in range(len(lengths))])
            totals = totals + 1
    if caches is not None:  # rows are packed from position 0: each row's first `total` columns are its cache
        past_names = kv.io_names()[0]
        for row, total in enumerate(totals):
            for i in range(caches):
                got_rows = buffers[past_names[i]][row : row + 1, :, :total]
                worst = _merge(worst, _compare([got_rows], [final_caches[row][i]]))
    return worst


#: How many of each prompt's last positions the fused decoder's check gathers logits for (speculative decoding's
#: multi-position step); the prompts are longer.
_FUSED_KEEP = 3


def _run_in_place(session: Any, feeds: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> np.ndarray:
    """Run with each past buffer bound as its own present output (how the runtime shares them)."""
    binding = session.io_binding()
    outputs = {o.name for o in session.get_outputs()}  # a part of the graph (partial check) may lack some
    if "logits" in outputs:
        binding.bind_output("logits")  # first, so it is output 0 below
    inputs = {i.name for i in session.get_inputs()}
    for name, value in feeds.items():
        if name not in buffers and name in inputs:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name, buffer in buffers.items():
        present = name.replace("past_key_values", "present")
        binding.bind_input(name, "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
        if present in outputs:
            binding.bind_output(present, "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0] if "logits" in outputs else None


_EMBED_CHUNK = 16384


def export_embedding_table(
    adapter: VLMAdapter, path: Path, precision: str, index: ContentIndex | None = None, codes: Any = None
) -> GraphSpec:
    """The token embedding as a plain ``.npy`` table: the runtime memory-maps it and gathers rows. Its data starts
    page-aligned and is recorded in ``index``, so a tied LM head in the decoder graphs points at these bytes.

    ``codes`` (an :class:`~edgelvm.models.checkpoint.codes.Int4Weight` over ``[vocab, hidden]``, from a quantized
    checkpoint): the table is stored as those codes and scales instead (the torch module already computes with their
    values) — unless the module's output is not its weight's rows (e.g. Gemma scales by sqrt(hidden)), where the
    float rows of the module's output are written."""
    embedding = adapter.input_embeddings()
    vocab, width = embedding.weight.shape
    dtype = "float16" if precision == "fp16" else "float32"
    if codes is not None:
        probe = torch.arange(min(vocab, 8))
        with torch.no_grad():
            plain = torch.equal(embedding(probe), embedding.weight[probe])
        if plain:
            return _coded_table(path, codes, dtype, index)
        log.info("embedding table: the module scales its rows, so the table is written in float")

    def chunks() -> Any:  # the module's output, not its weight: Gemma's embedding scales by sqrt(hidden)
        with torch.no_grad():
            for start in range(0, vocab, _EMBED_CHUNK):  # no second full-size copy of a large table
                yield embedding(torch.arange(start, min(start + _EMBED_CHUNK, vocab))).float().numpy()

    region, hexdigest = save_npy_aligned(path, (vocab, width), np.dtype(dtype), chunks())
    if index is not None:
        index.add_digest(hexdigest, region)
    return GraphSpec(
        file=path.name,
        kind="table",
        precision=precision,
        inputs=[TensorSpec("input_ids", "int64", ["batch", "seq"])],
        outputs=[TensorSpec("inputs_embeds", dtype, ["batch", "seq", int(width)])],
    )


def _coded_table(path: Path, codes: Any, dtype: str, index: ContentIndex | None) -> GraphSpec:
    """Codes in ``path`` and scales (zero points) beside it, each page-aligned and in ``index``: a tied head's
    MatMulNBits initializers in the fused decoder are these same bytes and point here."""
    files = {"scales": path.with_name(path.stem + "_scales.npy"), "zero_points": None}
    region, digest = save_npy_aligned(path, codes.packed.shape, np.dtype(np.uint8), [codes.packed])
    arrays = [(files["scales"], codes.scales)]
    if codes.zero_points is not None:
        files["zero_points"] = path.with_name(path.stem + "_zero_points.npy")
        arrays.append((files["zero_points"], codes.zero_points))
    regions = [(region, digest)]
    for file, array in arrays:
        regions.append(save_npy_aligned(file, array.shape, array.dtype, [array]))
    if index is not None:
        for where, hexdigest in regions:
            index.add_digest(hexdigest, where)
    return GraphSpec(
        file=path.name,
        kind="table",
        precision=f"int{codes.bits}",
        inputs=[TensorSpec("input_ids", "int64", ["batch", "seq"])],
        outputs=[TensorSpec("inputs_embeds", dtype, ["batch", "seq", int(codes.k)])],
        codes={"bits": codes.bits, "block_size": codes.block_size, "width": codes.k,
               "scales": files["scales"].name, "zero_points": files["zero_points"] and files["zero_points"].name},
    )  # fmt: skip
