"""The synthetic "shapes" visual question answering task: edgelvm's shipped default.

Why a synthetic task: compression stages (distill, prune, quantize, export) must be tested on a model that has
actually learned something, with an accuracy that can *drop*, in minutes on a CPU and without downloading data.
Every image is a few flat shapes on a 3x3 grid, and every question has one short, exact-match answer computed from
the scene, so accuracy is unambiguous and a broken model is caught.

Determinism: sample ``i`` of a split with seed ``s`` is drawn from ``numpy.random.default_rng([s, i, attempt])``
alone, so it does not depend on how many samples come before it or on the platform; PNG bytes are identical run
to run (Pillow writes no timestamps).

Scene rules (what makes every answer well defined):

- shapes sit in distinct cells of a 3x3 grid (no overlap), so "where" has one answer: the cell name
  (``top left`` ... ``bottom right``, the middle row/column named ``left``/``center``/``right``/``top``/``bottom``);
- a (color, kind) pair appears at most once per scene, so "the red square" names one shape;
- ``color`` questions ask only about a kind that appears exactly once;
- ``exist`` questions alternate present / absent (exactly half absent: a POPE-style hallucination probe); absent
  objects are chosen adversarially half the time (same kind in another color, or same color as a present shape);
- captions list shapes in reading order (top to bottom, then left to right).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgelvm.data.jsonl import check_dataset_output, write_jsonl_dataset

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
GRID = 3
ROW_NAMES = ("top", "", "bottom")
COL_NAMES = ("left", "", "right")
QTYPES: tuple[str, ...] = ("color", "count", "position", "exist", "caption")
MAX_SHAPES = 4

DEFAULT_IMAGE_SIZE = 96
MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 128

#: Fixed, distinct seeds of the shipped splits; val and test are de-duplicated against the splits before them.
SPLIT_SEEDS: dict[str, int] = {"train": 1, "val": 2, "test": 3}
SPLIT_SIZES: dict[str, int] = {"train": 20000, "val": 500, "test": 1000}
#: Per-channel mean/std of the task's images (measured on 2000 train images, rounded); used by the processor.
IMAGE_MEAN: tuple[float, float, float] = (0.834, 0.825, 0.819)
IMAGE_STD: tuple[float, float, float] = (0.118, 0.128, 0.152)

_SUPERSAMPLE = 3  # draw at 3x then downsample: anti-aliased edges, closer to real images
_NOISE_STD = 3.0
_MAX_ATTEMPTS = 1000


@dataclass(frozen=True)
class Shape:
    """One shape of a scene; ``row``/``col`` index the 3x3 grid (0 = top / left)."""

    kind: str
    color: str
    size: str
    row: int
    col: int

    @property
    def cell(self) -> str:
        return cell_name(self.row, self.col)

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "color": self.color, "size": self.size, "row": self.row, "col": self.col}

    @classmethod
    def from_dict(cls, d: dict) -> Shape:
        return cls(str(d["kind"]), str(d["color"]), str(d["size"]), int(d["row"]), int(d["col"]))


@dataclass(frozen=True)
class Sample:
    """One generated question about one image. ``png`` is the canonical image (what gets written and hashed)."""

    id: str
    seed: int
    index: int
    qtype: str
    question: str
    answer: str
    scene: tuple[Shape, ...]
    png: bytes = field(repr=False)
    absent: bool | None = None  # exist questions only: True when the asked-about object is not in the image
    number: int | None = None  # scenes only: the number on the image's sign, when it has one

    @property
    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.png)).convert("RGB")

    @property
    def key(self) -> str:
        """Identity for de-duplication across splits: hash of image bytes + question."""
        return sample_key(self.png, self.question)


def sample_key(png: bytes, question: str) -> str:
    h = hashlib.sha256(png)
    h.update(b"\0")
    h.update(question.encode("utf-8"))
    return h.hexdigest()


def cell_name(row: int, col: int) -> str:
    """Grid cell name: ``top left``, ``top``, ..., ``center``, ..., ``bottom right``."""
    name = " ".join(p for p in (ROW_NAMES[row], COL_NAMES[col]) if p)
    return name or "center"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Iterable[Shape]) -> str:
    """Canonical caption: shapes in reading order, e.g. ``a red circle, a blue square and a green cross``."""
    parts = [f"{article(s.color)} {s.color} {s.kind}" for s in sorted(scene, key=lambda s: (s.row, s.col))]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# --------------------------------------------------------------------------------------------------- questions

_COLOR_Q = ("What color is the {kind}?", "What is the color of the {kind}?")
_COUNT_ALL_Q = ("How many shapes are there?", "How many shapes are in the image?")
_COUNT_COLOR_Q = ("How many {color} shapes are there?",)
_COUNT_KIND_Q = ("How many {plural} are there?",)
_POSITION_Q = ("Where is the {color} {kind}?", "In which part of the image is the {color} {kind}?")
_EXIST_Q = ("Is there {a} {color} {kind}?", "Is there {a} {color} {kind} in the image?")
_EXIST_KIND_Q = ("Is there a {kind}?",)
_CAPTION_Q = ("Describe the image.", "What shapes are in the image?")


def task_texts() -> list[str]:
    """Every question template filled with every word, plus every possible answer and caption word.

    Used to build the task tokenizer: it covers the task's whole vocabulary without sampling.
    """
    texts: list[str] = []
    for kind in KINDS:
        plural = PLURALS[kind]
        texts += [t.format(kind=kind) for t in _COLOR_Q + _EXIST_KIND_Q]
        texts += [t.format(plural=plural) for t in _COUNT_KIND_Q]
        for color in COLORS:
            texts += [t.format(a=article(color), color=color, kind=kind) for t in _POSITION_Q + _EXIST_Q]
            texts.append(caption([Shape(kind, color, "small", 0, 0)] * 3))
    for color in COLORS:
        texts += [t.format(color=color) for t in _COUNT_COLOR_Q]
        texts.append(color)
    texts += list(_COUNT_ALL_Q) + list(_CAPTION_Q)
    texts += [str(n) for n in range(MAX_SHAPES + 1)] + ["yes", "no"]
    texts += [cell_name(r, c) for r in range(GRID) for c in range(GRID)]
    return texts


# ------------------------------------------------------------------------------------------------------ scenes


def _random_scene(rng: np.random.Generator, n: int) -> tuple[Shape, ...]:
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    pairs = rng.choice(len(KINDS) * len(COLORS), size=n, replace=False)  # (color, kind) unique per scene
    colors = list(COLORS)
    shapes = []
    for cell, pair in zip(cells, pairs, strict=True):
        kind, color = KINDS[int(pair) % len(KINDS)], colors[int(pair) // len(KINDS)]
        size = SIZES[int(rng.integers(len(SIZES)))]
        shapes.append(Shape(kind, color, size, int(cell) // GRID, int(cell) % GRID))
    return tuple(shapes)


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list) -> object:
    return options[int(rng.integers(len(options)))]


def _question(rng: np.random.Generator, qtype: str, absent: bool | None) -> tuple[tuple[Shape, ...], str, str]:
    """Draw a scene and a question of ``qtype`` that is well defined on it; return (scene, question, answer)."""
    for _ in range(_MAX_ATTEMPTS):
        scene = _random_scene(rng, int(rng.integers(1, MAX_SHAPES + 1)))
        kinds = [s.kind for s in scene]
        if qtype == "color":
            unique = [s for s in scene if kinds.count(s.kind) == 1]
            if not unique:
                continue
            target = _pick(rng, unique)
            return scene, str(_pick(rng, _COLOR_Q)).format(kind=target.kind), target.color
        if qtype == "count":
            variant = int(rng.integers(3))
            if variant == 0:
                return scene, str(_pick(rng, _COUNT_ALL_Q)), str(len(scene))
            # ask about a present attribute 3/4 of the time, so "0" is possible but not dominant
            present = rng.random() < 0.75
            if variant == 1:
                color = _pick(rng, [s.color for s in scene]) if present else _pick(rng, list(COLORS))
                n = sum(s.color == color for s in scene)
                return scene, _COUNT_COLOR_Q[0].format(color=color), str(n)
            kind = _pick(rng, kinds) if present else _pick(rng, KINDS)
            return scene, _COUNT_KIND_Q[0].format(plural=PLURALS[str(kind)]), str(kinds.count(str(kind)))
        if qtype == "position":
            target = _pick(rng, scene)
            q = str(_pick(rng, _POSITION_Q)).format(color=target.color, kind=target.kind)
            return scene, q, target.cell
        if qtype == "exist":
            return _exist_question(rng, scene, bool(absent))
        if qtype == "caption":
            return scene, str(_pick(rng, _CAPTION_Q)), caption(scene)
        raise ValueError(f"unknown qtype {qtype!r}")
    raise RuntimeError(f"could not draw a well-defined {qtype} question in {_MAX_ATTEMPTS} tries")  # pragma: no cover


def _exist_question(rng: np.random.Generator, scene: tuple[Shape, ...], absent: bool) -> tuple:
    present_pairs = {(s.color, s.kind) for s in scene}
    present_kinds = {s.kind for s in scene}
    kind_only = rng.random() < 0.25 and (not absent or len(present_kinds) < len(KINDS))
    if kind_only:
        pool = [k for k in KINDS if k not in present_kinds] if absent else sorted(present_kinds)
        kind = _pick(rng, pool)
        return scene, _EXIST_KIND_Q[0].format(kind=kind), "no" if absent else "yes"
    if absent:
        candidates = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present_pairs]
        if rng.random() < 0.5:  # adversarial: shares a color or a kind with something in the image
            near = [(c, k) for c, k in candidates if k in present_kinds or c in {s.color for s in scene}]
            candidates = near or candidates
        color, kind = _pick(rng, candidates)
    else:
        target = _pick(rng, scene)
        color, kind = target.color, target.kind
    q = str(_pick(rng, _EXIST_Q)).format(a=article(color), color=color, kind=kind)
    return scene, q, "no" if absent else "yes"


# ----------------------------------------------------------------------------------------------------- drawing


def render(scene: Iterable[Shape], rng: np.random.Generator, image_size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """Draw ``scene``: mild random background tint, shapes with slight color/position jitter, faint noise."""
    s = image_size * _SUPERSAMPLE
    cell = s / GRID
    base = rng.integers(195, 240)
    bg = tuple(int(np.clip(base + rng.integers(-12, 13), 0, 255)) for _ in range(3))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    for shape in scene:
        r = cell * (0.36 if shape.size == "large" else 0.22)
        slack = cell / 2 - r - 2 * _SUPERSAMPLE
        cx = (shape.col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (shape.row + 0.5) * cell + rng.uniform(-slack, slack)
        fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[shape.color])
        _draw_shape(draw, shape.kind, cx, cy, r, fill)
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, _NOISE_STD, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif kind == "cross":
        t = r * 0.33
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------- samples


def qtype_for_index(index: int) -> tuple[str, bool | None]:
    """Round-robin question types (balanced mix); every other exist question asks about an absent object."""
    qtype = QTYPES[index % len(QTYPES)]
    absent = (index // len(QTYPES)) % 2 == 1 if qtype == "exist" else None
    return qtype, absent


def generate_sample(seed: int, index: int, image_size: int = DEFAULT_IMAGE_SIZE, attempt: int = 0) -> Sample:
    """Sample ``index`` of the split drawn with ``seed``; ``attempt`` > 0 redraws it (used for de-duplication)."""
    check_image_size(image_size)
    rng = np.random.default_rng([seed, index, attempt])
    qtype, absent = qtype_for_index(index)
    scene, question, answer = _question(rng, qtype, absent)
    png = _png(render(scene, rng, image_size))
    return Sample(
        id=f"shapes-s{seed}-{index:06d}",
        seed=seed,
        index=index,
        qtype=qtype,
        question=question,
        answer=answer,
        scene=scene,
        png=png,
        absent=absent,
    )


def check_image_size(image_size: int) -> None:
    from edgelvm.errors import ConfigError

    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE or image_size % GRID:
        raise ConfigError(
            f"image size {image_size} is not supported",
            fix=f"use a multiple of {GRID} from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default {DEFAULT_IMAGE_SIZE})",
        )


def generate_split(
    seed: int, n: int, image_size: int = DEFAULT_IMAGE_SIZE, exclude: set[str] | None = None
) -> list[Sample]:
    """``n`` samples from ``seed``. A sample whose :attr:`Sample.key` is in ``exclude`` (or repeats one already
    drawn) is redrawn with the next ``attempt`` at the same index, so the qtype mix and the length stay exact."""
    return draw_unique(seed, n, lambda i, attempt: generate_sample(seed, i, image_size, attempt), exclude)


def draw_unique(seed: int, n: int, draw: Callable[[int, int], Sample], exclude: set[str] | None = None) -> list[Sample]:
    """``draw(index, attempt)`` for indices ``0..n-1``, each redrawn with the next attempt while its key is in
    ``exclude`` or already drawn (shared by the synthetic tasks)."""
    if n < 1:
        from edgelvm.errors import ConfigError

        raise ConfigError(f"n must be >= 1, got {n}", fix="ask for at least one sample")
    seen = set(exclude or ())
    out: list[Sample] = []
    for i in range(n):
        for attempt in range(_MAX_ATTEMPTS):
            sample = draw(i, attempt)
            if sample.key not in seen:
                break
            logger.debug("sample %s collides with an excluded sample; redrawing", sample.id)
        else:  # pragma: no cover - would need an absurdly small task
            raise RuntimeError(f"could not draw a unique sample {i} for seed {seed}")
        seen.add(sample.key)
        out.append(sample)
    return out


def generate_shipped_splits(
    sizes: dict[str, int] | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> dict[str, list[Sample]]:
    """train / val / test from :data:`SPLIT_SEEDS`; each split is de-duplicated against the ones before it."""
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    taken: set[str] = set()
    splits: dict[str, list[Sample]] = {}
    for name in ("train", "val", "test"):
        splits[name] = generate_split(SPLIT_SEEDS[name], sizes[name], image_size, exclude=taken)
        taken.update(s.key for s in splits[name])
    return splits


# ----------------------------------------------------------------------------------------------------- records


def to_record(sample: Sample) -> dict[str, object]:
    """The LLaVA conversation record of a sample (image path relative to the jsonl's directory)."""
    rec: dict[str, object] = {
        "id": sample.id,
        "image": f"images/{sample.id}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ],
        "qtype": sample.qtype,
    }
    if sample.absent is not None:
        rec["absent"] = sample.absent
    rec["scene"] = [s.to_dict() for s in sample.scene]
    return rec


def write_split(
    out_dir: str | Path,
    seed: int,
    n: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: bool = False,
    exclude: set[str] | None = None,
) -> Path:
    """Generate a split and write it atomically as ``out_dir/data.jsonl`` + ``out_dir/images/*.png``."""
    check_dataset_output(out_dir, force)  # before spending time generating
    samples = generate_split(seed, n, image_size, exclude=exclude)
    return write_jsonl_dataset(out_dir, ((to_record(s), s.png) for s in samples), force=force)


def write_shipped_splits(
    out_root: str | Path,
    sizes: dict[str, int] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: bool = False,
) -> dict[str, Path]:
    """Write the de-duplicated shipped splits to ``out_root/{train,val,test}``."""
    root = Path(out_root)
    for name in SPLIT_SEEDS:
        check_dataset_output(root / name, force)
    splits = generate_shipped_splits(sizes, image_size)

    return {
        name: write_jsonl_dataset(root / name, ((to_record(s), s.png) for s in samples), force=force)
        for name, samples in splits.items()
    }
