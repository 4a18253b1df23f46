"""The ``edgelvm`` command line: a thin shell over the stage functions.

Every verb imports its stage lazily, so ``edgelvm --help`` and ``edgelvm generate`` never pay for torch.
An :class:`~edgelvm.errors.EdgeLVMError` is printed as a short message (problem, where, fix) with exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgelvm import __version__

app = typer.Typer(
    name="edgelvm",
    help="Distill, prune, quantize and export vision-language models for the edge.\n\n"
    "Quick start:  edgelvm demo    (builds, exports and runs a small LLaVA end to end)",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"edgelvm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="-v: progress logs, -vv: debug")] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:  # the ONNX exporter's optimizer is very chatty at INFO
        for name in ("onnxscript", "onnx_ir", "torch.onnx"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _console():
    from rich.console import Console

    return Console(stderr=True)


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Hugging Face checkpoint: a local directory (or a hub id when online).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle directory to write.")],
    dtype: Annotated[str, typer.Option(help="Graph precision: fp32 or fp16.")] = "fp32",
    max_length: Annotated[
        int | None, typer.Option(help="Context (prompt incl. image tokens + new tokens) the KV cache is sized for.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty output directory (atomically).")] = False,
    target: Annotated[
        str | None, typer.Option(help="Device profile (see `edgelvm devices`): fit check + predicted tokens/s.")
    ] = None,
    decoder: Annotated[
        str, typer.Option(help="auto (portable + ORT-fused where possible) | portable (smaller) | fused.")
    ] = "auto",
    int4_accuracy_level: Annotated[
        int, typer.Option(help="INT4 checkpoints: MatMulNBits accuracy_level (0 fp32 compute, 4 int8 activations).")
    ] = 0,
    image_tokens: Annotated[
        str | None,
        typer.Option(
            metavar="N|FRACTION",
            help="Keep N image tokens per image (an integer, e.g. 144) or a fraction of them (e.g. 0.25), chosen by "
            "the vision tower's own attention inside the vision graph (VisionZip's dominant tokens): a shorter "
            "prefill. llava family only; default: all tokens.",
        ),
    ] = None,
) -> None:
    """Export a VLM checkpoint to a self-describing bundle (vision/decoder ONNX, embedding table, tokenizer).

    Each graph is checked against PyTorch on random inputs; the errors are printed and stored in the manifest.

    Example:  edgelvm export ./llava-1.5-7b-hf -o bundles/llava --max-length 2048
    """
    from rich.table import Table

    from edgelvm.export import ExportConfig
    from edgelvm.export import export as run_export
    from edgelvm.models.token_reduction import parse_image_tokens

    console = _console()
    with console.status(f"exporting {model} …"):
        config = ExportConfig(dtype=dtype, max_length=max_length, force=force, target=target, decoder=decoder,
                              int4_accuracy_level=int4_accuracy_level,
                              image_tokens=parse_image_tokens(image_tokens))  # fmt: skip
        report = run_export(model, output, config)
    table = Table(title=f"bundle {report.bundle_dir} ({report.seconds:.0f} s)")
    for column in ("part", "file", "size", "error vs PyTorch"):
        table.add_column(column)
    for row in report.summary_rows():
        table.add_row(*row)
    console.print(table)
    if report.manifest.image_token_reduction:
        kept = report.manifest.image_token_reduction
        console.print(
            f"image tokens: {kept['tokens_per_image']} of {kept['full_tokens_per_image']} per image, ranked by "
            f"{kept['score']} in vision layer {kept['vision_layer']} ({kept['method']})"
        )
    if report.manifest.target:
        plan = report.manifest.target
        console.print(
            f"target {plan['display_name']}: {plan['total_bytes'] / 2**30:.2f} of {plan['usable_bytes'] / 2**30:.2f} "
            f"GiB usable; predicted decode ≤ {plan['predicted_decode_tokens_per_s']:.0f} tokens/s (bandwidth roofline)"
        )


@app.command()
def generate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `edgelvm export`.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question or instruction.")],
    image: Annotated[list[Path] | None, typer.Option("--image", "-i", help="Image file (repeat for several).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Token budget for the answer.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy (default, reproducible).")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    backend: Annotated[str, typer.Option(help="auto | onnxruntime-cpu | onnxruntime-cuda | onnxruntime-tensorrt")] = (
        "auto"
    ),
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (default: onnxruntime's choice).")] = None,
    stats: Annotated[bool, typer.Option(help="Print timings to stderr afterwards.")] = False,
    draft: Annotated[
        Path | None, typer.Option(help="A draft bundle (same tokenizer): speculative decoding, the same greedy text.")
    ] = None,
    draft_tokens: Annotated[int, typer.Option(help="Tokens the draft proposes per target step.")] = 4,
) -> None:
    """Answer a prompt about images, streaming the text to stdout (torch-free).

    Example:  edgelvm generate bundles/llava -i photo.jpg -p "What is on the table?"
    """
    from edgelvm.runtime import VLM

    vlm = VLM.load(bundle, backend=backend, threads=threads, draft=draft, draft_tokens=draft_tokens)
    pieces = vlm.generate(
        list(image or []),
        prompt,
        max_new_tokens=max_new_tokens,
        stream=True,
        stop=tuple(stop or ()),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats:
        s = vlm.last_stats
        _console().print(
            f"vision {s.vision_ms:.1f} ms · prefill {s.prefill_ms:.1f} ms ({s.prompt_tokens} tokens) · "
            f"{s.new_tokens} new tokens · decode {s.decode_tokens_per_s:.1f} tok/s"
            + (f" · draft kept {s.acceptance_rate:.0%} of {s.draft_tokens}" if s.draft_tokens else "")
        )


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    verify: Annotated[bool, typer.Option(help="Check every file's sha256.")] = True,
) -> None:
    """Show a bundle: graphs, precisions, sizes, KV cache, preprocessing and provenance."""
    from edgelvm.inspect import describe_bundle

    if as_json:
        from edgelvm.manifest import Manifest

        print(json.dumps(Manifest.load(bundle).to_dict(), indent=2))
        return
    describe_bundle(bundle, console=_console(), verify=verify)


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="A bundle (runs torch-free) or a Hugging Face checkpoint directory.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset: a directory with data.jsonl, or a .jsonl file.")],
    reference: Annotated[
        str | None, typer.Option(help="Teacher (bundle or checkpoint): report top-1 agreement and mean KL.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write eval.json and eval.md here.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N records.")] = None,
    batch_size: Annotated[int, typer.Option(help="Questions per batch.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length budget.")] = 32,
) -> None:
    """Exact-match accuracy per question type and hallucination rate; with --reference, agreement with a teacher.

    Example:  edgelvm eval bundles/student -d data/shapes/test --reference models/shapes-teacher -o reports/student
    """
    from rich.markdown import Markdown

    from edgelvm.eval import EvalConfig, evaluate

    report = evaluate(
        model, data, EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, reference=reference)
    )
    if out is not None:
        report.write(out)
    _console().print(Markdown(report.markdown()))


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option("--workdir", "-o", help="Where the demo writes its model and bundle.")
    ] = Path("runs/demo"),
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate in the demo answer.")] = 24,
    distill_steps: Annotated[int, typer.Option(help="Distillation steps of the demo's student.")] = 300,
    compress: Annotated[bool, typer.Option(help="Also distil, prune and quantize the teacher (a few minutes).")] = True,
) -> None:
    """Run the pipeline end to end on the default model: export → eval → distill + prune → comparison table."""
    from edgelvm.demo import run_demo

    run_demo(workdir, console=_console(), max_new_tokens=max_new_tokens, distill_steps=distill_steps, compress=compress)


def _mount_optional_apps() -> None:
    from edgelvm.cli_devices import register
    from edgelvm.serve.cli import serve

    register(app)  # devices, build, bench
    from edgelvm.distill.cli import distill_command

    app.command("distill")(distill_command)
    from edgelvm.prune.cli import prune_command

    app.command("prune")(prune_command)
    from edgelvm.quantize.cli import quantize_command

    app.command("quantize")(quantize_command)
    app.command("serve")(serve)
    try:
        from edgelvm.data.cli import app as data_app
    except ImportError:  # pragma: no cover - data package always ships, guard keeps the CLI alive in a broken tree
        return
    app.add_typer(data_app, name="data", help="Datasets: the synthetic shapes task and jsonl (LLaVA format) files.")


_mount_optional_apps()


def main() -> None:
    from edgelvm.errors import EdgeLVMError

    try:
        app()
    except EdgeLVMError as err:
        from rich.markup import escape

        _console().print(f"[bold red]error:[/] {escape(str(err))}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
