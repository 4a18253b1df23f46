"""How close ONNX Runtime's ``MatMulNBits`` alone gets to the memory-bandwidth roofline: the ceiling of an INT4
decode step on this CPU, whatever the rest of the graph does.

Takes a bundle's fused decoder, keeps only its ``MatMulNBits`` nodes (the same initializers, each fed from a graph
input of its K, run back to back in one session) and times them, per group (all, lm_head, qkv, o_proj, gate_up,
down): bytes read / time against this machine's read bandwidth. Interleaved rounds, medians; 2 threads, spinning.

    python benchmarks/matmul_ceiling.py runs/bench/realistic/bundle-int4-g128-head-int4-al4
    python benchmarks/matmul_ceiling.py BUNDLE --accuracy-level 0 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def _attr(node, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def _group(node) -> str:
    return "lm_head" if node.name == "lm_head" else node.name.split(".", 1)[-1]


def build(nodes: list, inits: dict, threads: int, level: int | None) -> tuple:
    """A session of ``nodes`` alone, its feeds and the bytes its weights hold."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    widths = sorted({_attr(n, "K") for n in nodes})
    graph_nodes, outputs, used, nbytes = [], [], {}, 0
    for index, node in enumerate(nodes):
        copy = helper.make_node("MatMulNBits", [f"x{_attr(node, 'K')}", *node.input[1:]], [f"y{index}"],
                                domain="com.microsoft", name=f"m{index}")  # fmt: skip
        copy.attribute.extend(node.attribute)
        for attribute in copy.attribute:
            if attribute.name == "accuracy_level" and level is not None:
                attribute.i = level
        graph_nodes.append(copy)
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, [1, _attr(node, "N")]))
        for name in node.input[1:]:
            if name not in used:
                used[name] = inits[name]
                nbytes += numpy_helper.to_array(inits[name]).nbytes
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in widths]
    graph = helper.make_graph(graph_nodes, "matmuls", inputs, outputs, initializer=list(used.values()))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {f"x{k}": rng.standard_normal((1, k), dtype=np.float32) for k in widths}
    return session, feeds, nbytes, len(nodes)


def main() -> None:
    import onnx

    from edgelvm.devices.roofline import measure_read_bandwidth

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--accuracy-level", type=int, default=None, help="override the graph's (default: keep it)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    model = onnx.load(str(args.bundle / "decoder_ort.onnx"))  # external data (and the table's codes) loaded
    inits = {t.name: t for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    groups = {"all": matmuls}
    for node in matmuls:
        groups.setdefault(_group(node), []).append(node)
    sessions = {name: build(nodes, inits, args.threads, args.accuracy_level) for name, nodes in groups.items()}
    bandwidth = [measure_read_bandwidth()]
    for session, feeds, _, _ in sessions.values():
        for _ in range(5):
            session.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, (session, feeds, _, _) in sessions.items():
            samples = []
            for _ in range(25):
                started = time.perf_counter()
                session.run(None, feeds)
                samples.append(time.perf_counter() - started)
            times[name].append(statistics.median(samples))
    bandwidth.append(measure_read_bandwidth())
    bw = statistics.median(bandwidth)
    level = "as exported" if args.accuracy_level is None else args.accuracy_level
    print(f"{args.bundle}: MatMulNBits alone, accuracy_level {level}, {args.threads} threads, read bandwidth "
          f"{bw / 1e9:.1f} GB/s (median of {len(bandwidth)} probes)\n")  # fmt: skip
    print("| group | nodes | MB | ms | GB/s | of bandwidth | µs / node |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (_, _, nbytes, count) in sessions.items():
        t = statistics.median(times[name])
        print(f"| {name} | {count} | {nbytes / 1e6:.2f} | {t * 1e3:.3f} | {nbytes / t / 1e9:.1f} | "
              f"{nbytes / t / bw:.0%} | {t / count * 1e6:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
