"""``edgelvm data ...``: dataset commands. Mounted by the main CLI as the ``data`` sub-command.

Imports of numpy/PIL/rich happen inside the commands so ``edgelvm --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

app = typer.Typer(help="Datasets: generate the synthetic VQA tasks (shapes, scenes).", no_args_is_help=True)


@app.callback()
def _data() -> None:
    """Datasets (LLaVA conversation jsonl + images)."""


@app.command("shapes")
def shapes(
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory (data.jsonl + images/).")],
    seed: Annotated[int | None, typer.Option(help="Random seed (default: the shipped train seed).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of samples (default: the shipped train size).")] = None,
    image_size: Annotated[int, typer.Option(help="Image side in pixels (multiple of 3, 64-128).")] = 96,
    shipped: Annotated[
        bool, typer.Option("--shipped", help="Write the de-duplicated shipped splits to OUT/train, OUT/val, OUT/test.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
) -> None:
    """Generate the synthetic shapes VQA task (deterministic per seed)."""
    from rich.console import Console

    from edgelvm.data import shapes as sh
    from edgelvm.errors import ConfigError, EdgeLVMError

    console = Console()
    try:
        if shipped:
            if seed is not None:
                raise ConfigError("--seed cannot be combined with --shipped", fix="drop --seed (fixed seeds)")
            sizes = {"train": n} if n is not None else None  # --n resizes train only; val/test stay fixed
            with console.status("generating shipped splits..."):
                paths = sh.write_shipped_splits(out, sizes=sizes, image_size=image_size, force=force)
            for name, path in paths.items():
                _summary(console, path, name)
            return
        seed = sh.SPLIT_SEEDS["train"] if seed is None else seed
        n = sh.SPLIT_SIZES["train"] if n is None else n
        with console.status(f"generating {n} samples (seed {seed})..."):
            path = sh.write_split(out, seed=seed, n=n, image_size=image_size, force=force)
        _summary(console, path, f"seed {seed}")
    except EdgeLVMError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(code=2) from e


@app.command("scenes")
def scenes(
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory (data.jsonl + images/).")],
    seed: Annotated[int | None, typer.Option(help="Random seed (default: the shipped test seed).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of samples (default: the shipped test size).")] = None,
    shipped: Annotated[
        bool, typer.Option("--shipped", help="Write the de-duplicated shipped splits to OUT/train, OUT/val, OUT/test.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a dataset edgelvm wrote.")] = False,
) -> None:
    """Generate the harder scenes VQA task: many small objects, counting to 14, relations, attribute binding,
    ordered captions, reading a sign's number, balanced existence probes (deterministic per seed)."""
    from rich.console import Console

    from edgelvm.data import scenes as sc
    from edgelvm.errors import ConfigError, EdgeLVMError

    console = Console()
    try:
        if shipped:
            if seed is not None:
                raise ConfigError("--seed cannot be combined with --shipped", fix="drop --seed (fixed seeds)")
            with console.status("generating shipped splits..."):
                paths = sc.write_shipped_splits(out, sizes={"train": n} if n is not None else None, force=force)
            for name, path in paths.items():
                _summary(console, path, name)
            return
        seed = sc.SPLIT_SEEDS["test"] if seed is None else seed
        n = sc.SPLIT_SIZES["test"] if n is None else n
        with console.status(f"generating {n} samples (seed {seed})..."):
            path = sc.write_split(out, seed=seed, n=n, force=force)
        _summary(console, path, f"seed {seed}")
    except EdgeLVMError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(code=2) from e


def _summary(console: Console, path: Path, label: str) -> None:
    """One line per split: where, how many records, the qtype mix."""
    from collections import Counter

    from edgelvm.data.jsonl import load_jsonl_dataset

    records = load_jsonl_dataset(path)
    mix = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r.qtype for r in records).items()))
    console.print(f"[green]wrote[/green] {path} ({label}): {len(records)} records [dim]({mix})[/dim]")
