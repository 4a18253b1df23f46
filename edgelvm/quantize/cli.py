"""``edgelvm quantize``: the CLI shell over :func:`edgelvm.quantize.quantize`.

``--llm`` / ``--vision`` pick a method config (:mod:`edgelvm.quantize.methods`); the options typed on the command
line become its knobs, and one the chosen method does not take is an error rather than silently ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

#: option (its parameter name) -> (part, the method config's knob)
KNOBS = {
    "group_size": ("llm", "group_size"),
    "asymmetric": ("llm", "symmetric"),
    "lm_head": ("llm", "lm_head"),
    "embeddings": ("llm", "embeddings"),
    "awq_clip": ("llm", "clip"),
    "gptq_damp": ("llm", "damp"),
    "act_order": ("llm", "act_order"),
    "smoothquant_alpha": ("llm", "alpha"),
    "calibrator": ("vision", "observer"),
    "eval_data": ("vision", "observer"),
}


def quantize_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Checkpoint directory (or hub id when online).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the quantized checkpoint and report.")],
    calib: Annotated[
        str | None, typer.Option(help="Calibration data: jsonl (LLaVA conversation format), or 'shapes'.")
    ] = None,
    llm: Annotated[
        str, typer.Option(help="Language model: INT4 weight-only awq | gptq | rtn, W8A8 smoothquant, or none.")
    ] = "awq",
    group_size: Annotated[int, typer.Option(help="INT4 block size along the input dimension (16-256).")] = 128,
    asymmetric: Annotated[bool, typer.Option(help="INT4 with zero points (TensorRT takes symmetric only).")] = False,
    lm_head: Annotated[
        str, typer.Option(help="INT4 methods: LM head float | int8 | int4 (block-wise, --group-size).")
    ] = "float",
    embeddings: Annotated[
        str, typer.Option(help="INT4 methods: token embedding table float | int8 (one scale per row).")
    ] = "float",
    vision: Annotated[str, typer.Option(help="Vision encoder + projector: int8 (W8A8) | none.")] = "int8",
    calibrator: Annotated[
        str, typer.Option(help="Vision activation observer: auto | minmax | percentile:99.99 | entropy | mse.")
    ] = "auto",
    eval_data: Annotated[
        str | None, typer.Option(help="With --calibrator auto: pick the observer by answer accuracy on this data.")
    ] = None,
    calib_limit: Annotated[int, typer.Option(help="Calibration records used.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Calibration batch size.")] = 16,
    awq_clip: Annotated[
        bool, typer.Option("--awq-clip/--no-awq-clip", help="AWQ: search per-block clipping (--no-awq-clip skips it).")
    ] = True,
    gptq_damp: Annotated[float, typer.Option(help="GPTQ: Hessian damping, a fraction of its mean diagonal.")] = 0.01,
    act_order: Annotated[
        bool,
        typer.Option(
            "--act-order/--no-act-order", help="GPTQ: activation order (--no-act-order: columns in natural order)."
        ),
    ] = True,
    smoothquant_alpha: Annotated[float, typer.Option(help="SmoothQuant: migration strength α.")] = 0.5,
    stats_memory_gb: Annotated[
        float | None,
        typer.Option(help="Memory (GB) for the LLM's Gram matrices; beyond it, layers are calibrated in groups "
                          "(default: a quarter of the model's weight bytes, 0.5 to 4)."),
    ] = None,
    layerwise: Annotated[
        bool,
        typer.Option(help="Calibrate and quantize one decoder layer at a time in fp32 (the model never runs whole: "
                          "pair with --dtype fp16/bf16 for models that do not fit in fp32)."),
    ] = False,
    dtype: Annotated[
        str, typer.Option(help="Load dtype: fp32 | fp16 | bf16 (the quantized checkpoint keeps it).")
    ] = "fp32",
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """INT4 weight-only language model (AWQ / GPTQ / RTN) and INT8 W8A8 vision encoder, calibrated on image+text.

    The result is a Hugging Face checkpoint (dequantized weights) plus the integer codes; `edgelvm export` writes
    MatMulNBits (ONNX Runtime) and QDQ / block-wise DequantizeLinear (TensorRT) graphs from it.

    Example:  edgelvm quantize models/shapes-teacher --calib data/shapes/val -o runs/int4 --llm awq --group-size 64
    """
    from rich.console import Console

    from edgelvm.errors import ConfigError
    from edgelvm.quantize import ObserverSweep, quantize
    from edgelvm.quantize.methods import method_config

    dtypes = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    if dtype not in dtypes:
        raise ConfigError(f"--dtype {dtype!r} is not a load dtype", where="--dtype", fix="use fp32, fp16 or bf16")
    if eval_data is not None and calibrator != "auto":
        raise ConfigError("--eval-data scores the observers of --calibrator auto; a named observer is not scored",
                          where="--eval-data", fix="drop --eval-data, or use --calibrator auto")  # fmt: skip
    observer = ObserverSweep(eval_data=eval_data) if calibrator == "auto" else calibrator
    values = {"group_size": group_size, "asymmetric": not asymmetric, "lm_head": lm_head, "embeddings": embeddings,
              "awq_clip": awq_clip, "gptq_damp": gptq_damp,
              "act_order": act_order, "smoothquant_alpha": smoothquant_alpha, "calibrator": observer,
              "eval_data": observer}  # fmt: skip
    # typer vendors click: its ParameterSource is compared by name
    typed = [p for p in KNOBS if ctx.get_parameter_source(p).name in ("COMMANDLINE", "ENVIRONMENT")]
    methods = []
    for part, name in (("llm", llm), ("vision", vision)):
        knobs = {KNOBS[p][1]: values[p] for p in typed if KNOBS[p][0] == part}
        where = {KNOBS[p][1]: "--" + p.replace("_", "-") for p in typed if KNOBS[p][0] == part}
        if part == "vision" and name != "none":
            knobs["observer"] = observer
        config = method_config(part, name, where, **knobs)
        if config is not None:
            methods.append(config)
    report = quantize(model, calib, methods, out=out, force=force, calib_limit=calib_limit, batch_size=batch_size,
                      stats_memory_gb=stats_memory_gb, layerwise=layerwise, dtype=dtypes[dtype],
                      progress=True)  # fmt: skip
    console = Console(stderr=True)
    console.print(report.summary())
    console.print(f"quantized checkpoint: {out} (export it with `edgelvm export {out} -o BUNDLE`; "
                  f"report: {out / 'quant_report.json'})")  # fmt: skip
