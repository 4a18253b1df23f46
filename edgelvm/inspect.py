"""``edgelvm inspect``: a human-readable view of a bundle (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelvm.manifest import Manifest, verify_bundle_files


def _shape(spec: Any) -> str:
    return "[" + ", ".join(str(d) for d in spec.shape) + "]"


def describe_bundle(bundle: str | Path, *, console: Any, verify: bool = True) -> Manifest:
    from rich.table import Table

    root = Path(bundle)
    manifest = Manifest.load(root)
    verify_bundle_files(root, manifest, check_hashes=verify)
    origin = manifest.created_from
    console.print(
        f"[bold]{root}[/]  family [cyan]{manifest.family}[/] · format {manifest.format_version} · "
        f"edgelvm {manifest.edgelvm_version} · files {'verified (sha256)' if verify else 'present'}"
    )
    console.print(
        f"from {origin.get('source')} ({origin.get('model_type')}: {origin.get('vision_model_type')} + "
        f"{origin.get('text_model_type')}); recipe: "
        + " → ".join(
            f"{r.get('stage')}({', '.join(f'{k}={v}' for k, v in r.items() if k != 'stage')})"
            for r in origin.get("recipe", [])
        )
    )

    graphs = Table(title="graphs")
    for column in ("part", "file", "kind", "precision", "MB", "inputs", "outputs", "max rel err"):
        graphs.add_column(column)
    for name, graph in manifest.graphs.items():
        size = sum(p.stat().st_size for p in root.glob(graph.file + "*")) / 1e6
        inputs = ", ".join(f"{t.name}{_shape(t)}" for t in graph.inputs[:3]) + (" …" if len(graph.inputs) > 3 else "")
        outputs = ", ".join(f"{t.name}{_shape(t)}" for t in graph.outputs[:2]) + (
            " …" if len(graph.outputs) > 2 else ""
        )
        err = f"{graph.parity['max_rel']:.1e}" if graph.parity else "-"
        graphs.add_row(name, graph.file, graph.kind, graph.precision, f"{size:.1f}", inputs, outputs, err)
    console.print(graphs)

    kv = manifest.kv_cache
    itemsize = 2 if kv.dtype == "float16" else 4
    per_token = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * itemsize
    console.print(
        f"KV cache: {kv.num_layers} layers × {kv.num_kv_heads} KV heads × head_dim {kv.head_dim}, {kv.dtype}, "
        f"layout {kv.layout}; max length {kv.max_length} → {per_token / 1024:.1f} KiB/token, "
        f"{per_token * kv.max_length / 2**20:.1f} MiB per sequence at max length"
    )
    if kv.windows:
        local = [layer for layer, w in zip(kv.kv_layers, kv.windows) if w is not None]
        console.print(
            f"sliding-window layers {local}: at most {kv.window} positions each at any length (the per-token figure "
            "above counts every layer at full length)"
        )
    if kv.states:
        layers, kinds = sorted({s.layer for s in kv.states}), ", ".join(sorted({s.kind for s in kv.states}))
        console.print(
            f"hybrid decoder: KV in layers {kv.kv_layers}; fixed-size states ({kinds}) in {len(layers)} layers → "
            f"{kv.state_bytes() / 2**20:.2f} MiB per sequence at any length"
        )
    pre = manifest.preprocess
    unit = "view" if pre.tiling_params else "image"  # tiled: an image's count depends on its size
    console.print(
        f"images: resize {pre.resize_mode} {pre.size} ({pre.resample}), crop {pre.center_crop}, mean {pre.mean}, "
        f"std {pre.std}; {pre.tokens_per_image} tokens per {unit} ({pre.image_token!r} = id {pre.image_token_id}), "
        f"tiling {pre.tiling}{f' {pre.tiling_params}' if pre.tiling_params else ''}; "
        f"positions {manifest.positions.get('kind')}"
    )
    tok = manifest.tokenizer
    console.print(
        f"tokenizer: {tok.file}, bos {tok.bos_token!r}, eos {tok.eos_token!r}, pad {tok.pad_token!r}, "
        f"chat template {'yes' if tok.chat_template else 'no'}; stop ids {manifest.generation.get('eos_token_ids')}"
    )
    return manifest
