"""INT8 vision encoder latency and fidelity at a realistic shape: edgelvm's W8A8 QDQ graph vs the fp32 graph vs
onnxruntime.quantization's own ``quantize_static`` (QDQ, MinMax, per-channel) on the same calibration images.

The realistic LLaVA (CLIP ViT-B/16 at 224 px + projector; random weights, see ``bench_models.py``) is quantized with
``edgelvm quantize --llm none --vision int8`` on shapes-task images; only the vision graph is exported (the
decoder is irrelevant here). Latency: one image, ONNX Runtime CPU, the three graphs interleaved over ``--rounds``
(median); fidelity: cosine of the image features to the fp32 graph's on held-out images (mean over tokens).
Results: ``benchmarks/results/quant_vision.{json,md}``.

    python benchmarks/quant_vision.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_io import save_results  # noqa: E402 (benchmarks/ is the script directory: on sys.path)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)))


def run(args: argparse.Namespace) -> dict:
    import torch
    from bench_models import prepare
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.data.shapes import write_split
    from edgelvm.export.onnx_graphs import export_vision
    from edgelvm.export.quantized import quantized_graph_rewrites
    from edgelvm.models import load_model
    from edgelvm.quantize import Int8VisionConfig, quantize
    from edgelvm.runtime.images import load_image
    from edgelvm.runtime.images.preprocess import ImagePreprocessor

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    checkpoint, _ = prepare("realistic", work)
    data = work / "realistic" / "vision_calib"
    if not (data / "data.jsonl").is_file():
        write_split(data, seed=21, n=args.calib + args.held_out, force=True)
    records = load_jsonl_dataset(data)
    calib, held_out = records[: args.calib], records[args.calib :]
    graphs = work / "realistic" / "vision_graphs"
    graphs.mkdir(parents=True, exist_ok=True)

    fp32 = graphs / "fp32.onnx"
    if not fp32.is_file():
        export_vision(load_model(str(checkpoint)), fp32, "fp32")
    quantized_dir = work / "realistic" / "int8-vision"
    if not (quantized_dir / "int8.safetensors").is_file():
        quantize(checkpoint, calib, Int8VisionConfig(), out=quantized_dir, force=True)
    report = json.loads((quantized_dir / "quant_report.json").read_text())
    edgelvm_int8 = graphs / "edgelvm_int8.onnx"
    if not edgelvm_int8.is_file():
        adapter = load_model(str(quantized_dir))
        export_vision(adapter, edgelvm_int8, "fp32", quantized_graph_rewrites(adapter)["vision"])

    adapter = load_model(str(checkpoint))
    spec = adapter.preprocess_spec()
    preprocess = ImagePreprocessor(spec)
    pixels = {r.id: preprocess([load_image(r.image_path)]) for r in records}
    ort_int8 = graphs / "ort_quantize_static.onnx"
    if not ort_int8.is_file():

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter({"pixel_values": pixels[r.id]} for r in calib)

            def get_next(self) -> dict | None:
                return next(self.items, None)

        quantize_static(str(fp32), str(ort_int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"])  # fmt: skip

    paths = {"fp32": fp32, "edgelvm INT8 (W8A8 QDQ)": edgelvm_int8, "ORT quantize_static INT8 (QDQ, MinMax)": ort_int8}
    sessions = {name: _session(path, args.threads) for name, path in paths.items()}
    reference = {r.id: sessions["fp32"].run(None, {"pixel_values": pixels[r.id]})[0] for r in held_out}
    x = pixels[held_out[0].id]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, {"pixel_values": x})
    for _ in range(args.rounds):
        for name, session in sessions.items():
            t = time.perf_counter()
            session.run(None, {"pixel_values": x})
            times[name].append((time.perf_counter() - t) * 1000)
    results = {}
    for name, session in sessions.items():
        cos = [_cosine(session.run(None, {"pixel_values": pixels[r.id]})[0], reference[r.id]) for r in held_out]
        results[name] = {
            "vision_ms": statistics.median(times[name]),
            "feature_cosine": float(np.mean(cos)),
            "graph_mb": sum(p.stat().st_size for p in graphs.glob(paths[name].name + "*")) / 1e6,
        }
    base = results["fp32"]["vision_ms"]
    for r in results.values():
        r["speedup"] = round(base / r["vision_ms"], 2)
    return {"results": results, "calibrator": report["calibrator"], "observer_scores": report["observer_scores"],
            "calib": args.calib, "held_out": args.held_out, "threads": args.threads, "rounds": args.rounds,
            "time": time.ctime()}  # fmt: skip


def markdown(summary: dict) -> str:
    lines = ["| vision graph | ms / image | × fp32 | feature cosine vs fp32 | graph MB |", "|" + " --- |" * 5]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r['vision_ms']:.1f} | {r['speedup']:.2f} | {r['feature_cosine']:.5f} | "
                     f"{r['graph_mb']:.1f} |")  # fmt: skip
    return "\n".join(lines) + (
        f"\n\nCLIP ViT-B/16 at 224 px + projector (random weights), one image, ONNX Runtime CPU, {summary['threads']} "
        f"threads, median of {summary['rounds']} interleaved runs; {summary['calib']} calibration images, cosine on "
        f"{summary['held_out']} held-out ones; edgelvm's observer: {summary['calibrator']}.\n"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--held-out", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    return p


def main() -> None:
    args = parser().parse_args()
    summary = run(args)
    save_results(args.results, "quant_vision", summary, markdown(summary))


if __name__ == "__main__":
    main()
