"""Sweep teacher-training recipes side by side on one GPU (used to choose ``train_teacher.py``'s defaults).

Why: the shipped teacher must reach its accuracy target in <= 60 CPU minutes, and a recipe costs an hour per try on
the 2-core CPU. On a GPU many recipes train at once on the *same* pre-rendered sample stream (the train seed's
samples 0..N-1, exactly what ``train_teacher.py`` streams), so "steps to reach X% val" compares directly, and the
winner's step count x the measured CPU seconds per step says whether it fits the CPU budget.

Usage (writes one JSON per recipe plus summary.json to --out)::

    python scripts/sweep_teacher.py --out runs/sweep --samples 256000 --minutes 6 --device cuda

The recipes are the ``RECIPES`` table below; each is a set of ``TrainConfig`` overrides.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("sweep_teacher")

RECIPES: dict[str, dict] = {
    "nocell": {"cell_loss": 0.0},
    "cell0.3": {"cell_loss": 0.3},
    "cell1": {"cell_loss": 1.0},
    "cell1-lr4e-4": {"cell_loss": 1.0, "lr": 4e-4, "warmup": 300},
    "cell3": {"cell_loss": 3.0},
}


# ---------------------------------------------------------------------------------------------- pre-rendered data


def _render_range(args: tuple[str, int, int, int, int]) -> list[tuple[str, str, str]]:
    from edgelvm.data import shapes as sh

    path, start, stop, n, size = args
    images = np.memmap(path, dtype=np.uint8, mode="r+", shape=(n, size, size, 3))
    meta = []
    for i in range(start, stop):
        s = sh.generate_sample(sh.SPLIT_SEEDS["train"], i, size)
        images[i] = np.asarray(s.image)
        meta.append((s.question, s.answer, s.qtype, [x.to_dict() for x in s.scene]))
    images.flush()
    return meta


def prerender(out: Path, n: int, size: int, workers: int) -> None:
    """The train stream's first ``n`` samples as one uint8 memmap + a JSON list of (question, answer, qtype)."""
    if (out / "meta.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / "images.u8"
    np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, size, size, 3)).flush()
    chunk = 2000
    jobs = [(str(path), a, min(a + chunk, n), n, size) for a in range(0, n, chunk)]
    t = time.time()
    with mp.Pool(workers) as pool:
        meta = [m for part in pool.map(_render_range, jobs) for m in part]
    (out / "meta.json").write_text(json.dumps(meta))
    log.info("pre-rendered %d samples in %.0f s", n, time.time() - t)


# ---------------------------------------------------------------------------------------------- one recipe


class _Q:
    __slots__ = ("answer", "qtype", "question", "scene")

    def __init__(self, question: str, answer: str, qtype: str, scene: list[dict]) -> None:
        from edgelvm.data.shapes import Shape

        self.question, self.answer, self.qtype = question, answer, qtype
        self.scene = [Shape.from_dict(d) for d in scene]


def run_recipe(name: str, overrides: dict, data: Path, n: int, size: int, out: Path, minutes: float, device: str):
    import torch
    import train_teacher as tt

    from edgelvm.data import shapes as sh

    torch.manual_seed(0)
    cfg = tt.TrainConfig(**{"steps": 8000, **overrides})
    cfg.image_size = cfg.image_size or cfg.spec.image_size
    tok = tt.build_shapes_tokenizer()
    processor = tt.build_processor(cfg, tok)
    model = tt.build_model(cfg, tok).to(device)
    batcher = tt.Batcher(processor, (cfg.image_size // cfg.patch_size) ** 2)
    images = np.memmap(data / "images.u8", dtype=np.uint8, mode="r", shape=(n, size, size, 3))
    meta = json.loads((data / "meta.json").read_text())
    mean = torch.tensor(sh.IMAGE_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(sh.IMAGE_STD, device=device).view(1, 3, 1, 1)

    def pixels(arr: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(device).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std

    # the fast path must equal the processor the teacher ships with
    ref = batcher.pixels([sh.generate_sample(sh.SPLIT_SEEDS["train"], i, size) for i in range(4)])
    torch.testing.assert_close(pixels(images[:4]).cpu(), ref, atol=1e-5, rtol=1e-5)

    val = sh.generate_split(sh.SPLIT_SEEDS["val"], sh.SPLIT_SIZES["val"], size)

    def evaluate() -> dict[str, float]:
        model.eval()
        hits: dict[str, int] = {}
        tot: dict[str, int] = {}
        with torch.no_grad():
            for i in range(0, len(val), 100):
                chunk = val[i : i + 100]
                b = batcher.train_batch(chunk)
                labels = b.pop("labels").to(device)
                b = {k: v.to(device) for k, v in b.items()}
                pred = model(**b).logits[:, :-1].argmax(-1)
                tgt = labels[:, 1:]
                ok = ((pred == tgt) | (tgt == -100)).all(1).tolist()
                for s, good in zip(chunk, ok, strict=True):
                    tot[s.qtype] = tot.get(s.qtype, 0) + 1
                    hits[s.qtype] = hits.get(s.qtype, 0) + int(good)
        model.train()
        acc = {q: hits[q] / tot[q] for q in sorted(tot)}
        acc["all"] = sum(hits.values()) / sum(tot.values())
        return acc

    loss_fn = tt.TeacherLoss(cfg, model).to(device)
    decay = [p for k, p in model.named_parameters() if p.ndim >= 2 and "embed" not in k]
    decay += loss_fn.parameters()
    no_decay = [p for k, p in model.named_parameters() if p.ndim < 2 or "embed" in k]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    n_params = sum(p.numel() for p in model.parameters())
    history: list[dict] = []
    result = {"name": name, "overrides": overrides, "params": n_params, "history": history}
    t0 = time.time()
    steps = min(cfg.steps, n // cfg.batch_size)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = tt.lr_at(cfg, step)
        a, b_ = step * cfg.batch_size, (step + 1) * cfg.batch_size
        qs = [_Q(*m) for m in meta[a:b_]]
        batch = batcher.text_batch(qs)
        batch = {k: v.to(device) for k, v in batch.items()} | {"pixel_values": pixels(images[a:b_])}
        loss, _ = loss_fn(model, batch, [q.scene for q in qs])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        done = step + 1
        out_of_time = time.time() - t0 > minutes * 60
        if done % 500 == 0 or done == steps or out_of_time:
            history.append({"step": done, "samples": done * cfg.batch_size, "loss": loss.item(), "val": evaluate()})
            result["seconds"] = time.time() - t0
            (out / f"{name}.json").write_text(json.dumps(result, indent=1))
            print(name, done, json.dumps(history[-1]["val"]), flush=True)
        if out_of_time:
            break
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--data", default="/tmp/shapes_stream")
    p.add_argument("--samples", type=int, default=256000)
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    out, data, size = Path(a.out), Path(a.data), 96
    out.mkdir(parents=True, exist_ok=True)
    if a.one:
        run_recipe(a.one, RECIPES[a.one], data, a.samples, size, out, a.minutes, a.device)
        return
    prerender(data, a.samples, size, a.workers)
    procs = []
    for name in a.recipes.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--out", str(out), "--data", str(data)]
        cmd += ["--samples", str(a.samples), "--minutes", str(a.minutes), "--device", a.device]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for proc in procs:
        proc.wait()
    summary = {}
    for name in a.recipes.split(","):
        f = out / f"{name}.json"
        if f.is_file():
            r = json.loads(f.read_text())
            summary[name] = [(h["step"], round(h["val"]["all"], 3)) for h in r["history"]] + [r.get("seconds")]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
