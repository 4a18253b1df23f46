"""The harder synthetic task ("scenes"): many small objects, multi-step questions, rendered digits to read.

Why a second task: on the shapes task (≤ 4 shapes on a 3x3 grid, 96 px) every compression variant scores
99–100%, so no table can rank methods. Here compression hurts where it hurts real VLMs:

- **fine scale**: 4–14 small objects (radius ~3–5% of the image) on a 6x6 grid of a 192-px image, so a model needs
  many image tokens and spatial detail;
- **several steps**: counting to 14 (``count``), spatial relations between two objects (``relation``: "What is
  immediately left of the red square?"), attribute binding across size, colour and kind (``binding``), captions that
  list every object in reading order (``caption``);
- **reading**: a sign with a 1–3 digit number (``read``) — the camera use case;
- **hallucination**: a balanced yes/no existence probe (``exist``, POPE-style: half the objects asked about are
  absent, half of those adversarial — sharing a colour or a kind with an object in the image).

Every sample is a pure function of ``(seed, index, attempt)``, like :mod:`edgelvm.data.shapes`, whose colours,
kinds and drawing it reuses; records have the same LLaVA conversation layout, so every stage reads them unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edgelvm.data.jsonl import check_dataset_output, write_jsonl_dataset
from edgelvm.data.shapes import (
    COLORS,
    KINDS,
    PLURALS,
    SIZES,
    Sample,
    Shape,
    _draw_shape,
    _pick,
    _png,
    article,
    draw_unique,
    to_record,
)

GRID = 6
IMAGE_SIZE = 192
MIN_OBJECTS, MAX_OBJECTS = 4, 14
QTYPES: tuple[str, ...] = ("count", "relation", "binding", "caption", "read", "exist")
#: Fixed, distinct seeds of the shipped splits (distinct from the shapes task's 1, 2, 3).
SPLIT_SEEDS: dict[str, int] = {"train": 11, "val": 12, "test": 13}
SPLIT_SIZES: dict[str, int] = {"train": 50000, "val": 1000, "test": 2400}
#: The sign occupies the bottom-right 2x2 cells when present; objects avoid them then.
SIGN_CELLS = frozenset((r, c) for r in (4, 5) for c in (4, 5))
_SUPERSAMPLE = 3
_NOISE_STD = 3.0
_MAX_ATTEMPTS = 1000

_COUNT_ALL_Q = ("How many objects are there?",)
_COUNT_COLOR_Q = ("How many {color} objects are there?",)
_COUNT_KIND_Q = ("How many {plural} are there?",)
_RELATION_Q = ("What is immediately {direction} the {color} {kind}?",)
_DIRECTIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
_BINDING_COLOR_Q = ("What color is the {size} {kind}?",)
_BINDING_KIND_Q = ("What shape is the {size} {color} object?",)
_CAPTION_Q = ("List every object from top left to bottom right.",)
_READ_Q = ("What number is on the sign?",)
_EXIST_Q = ("Is there {a} {color} {kind}?",)


def describe(shape: Shape) -> str:
    return f"{article(shape.color)} {shape.color} {shape.kind}"


def caption(scene: Iterable[Shape]) -> str:
    """Every object in reading order (row by row, left to right), e.g. ``a red circle, a blue cross and ...``."""
    parts = [describe(s) for s in sorted(scene, key=lambda s: (s.row, s.col))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def referents(qtype: str, question: str, scene: Iterable[Shape]) -> list[Shape] | None:
    """The objects a question names — what a model must look up to answer it: the asked-about object(s) of
    ``exist`` (none when absent), the one object of ``binding``, every object ``count`` counts, the anchor of
    ``relation``; None for questions that name no object (``caption``, ``read``). A training aid (an attention
    target), recomputed from the question's text so it holds for any sample of the task."""
    plural_kind = {PLURALS[k]: k for k in KINDS}
    for template, test in (
        (_EXIST_Q[0], lambda s, f: s.color == f["color"] and s.kind == f["kind"]),
        (_BINDING_COLOR_Q[0], lambda s, f: s.size == f["size"] and s.kind == f["kind"]),
        (_BINDING_KIND_Q[0], lambda s, f: s.size == f["size"] and s.color == f["color"]),
        (_COUNT_ALL_Q[0], lambda s, f: True),
        (_COUNT_COLOR_Q[0], lambda s, f: s.color == f["color"]),
        (_COUNT_KIND_Q[0], lambda s, f: s.kind == plural_kind.get(f["plural"])),
        (_RELATION_Q[0], lambda s, f: s.color == f["color"] and s.kind == f["kind"]),
    ):
        fields = _match(template, question)
        if fields is not None:
            return [s for s in scene if test(s, fields)]
    if qtype in ("caption", "read"):
        return None
    raise ValueError(f"{qtype} question {question!r} matches no template of the scenes task")


def _match(template: str, text: str) -> dict[str, str] | None:
    """``template``'s ``{field}`` values in ``text``, or None when ``text`` is not that template's."""
    pattern = re.escape(template)
    for name in re.findall(r"\{(\w+)\}", template):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>[a-z ]+?)")
    found = re.fullmatch(pattern, text)
    return found.groupdict() if found else None


def task_texts() -> list[str]:
    """Every question template filled with every word, and every answer word: the task tokenizer's corpus."""
    texts: list[str] = list(_COUNT_ALL_Q + _CAPTION_Q + _READ_Q)
    for kind in KINDS:
        texts += [t.format(plural=PLURALS[kind]) for t in _COUNT_KIND_Q]
        for size in SIZES:
            texts += [t.format(size=size, kind=kind) for t in _BINDING_COLOR_Q]
        for color in COLORS:
            texts += [t.format(a=article(color), color=color, kind=kind) for t in _EXIST_Q]
            texts += [t.format(direction=d, color=color, kind=kind) for t in _RELATION_Q for d in _DIRECTIONS]
            texts.append(caption([Shape(kind, color, "small", 0, c) for c in range(3)]))
    for color in COLORS:
        texts += [t.format(color=color) for t in _COUNT_COLOR_Q]
        texts += [t.format(size=size, color=color) for t in _BINDING_KIND_Q for size in SIZES]
    texts += [str(n) for n in range(1000)] + ["yes", "no", "nothing", *KINDS, *COLORS]
    return texts


# ------------------------------------------------------------------------------------------------------ scenes


def _random_scene(rng: np.random.Generator, n: int, sign: bool) -> tuple[Shape, ...]:
    cells = [(r, c) for r in range(GRID) for c in range(GRID) if not (sign and (r, c) in SIGN_CELLS)]
    chosen = rng.choice(len(cells), size=n, replace=False)
    colors = list(COLORS)
    return tuple(
        Shape(KINDS[int(rng.integers(len(KINDS)))], colors[int(rng.integers(len(colors)))],
              SIZES[int(rng.integers(len(SIZES)))], *cells[int(i)])
        for i in chosen
    )  # fmt: skip


def _unique(scene: tuple[Shape, ...], **attrs: str) -> list[Shape]:
    """Objects of ``scene`` that are the only one with their values of ``attrs`` (e.g. color and kind)."""

    def key(s: Shape) -> tuple:
        return tuple(getattr(s, a) for a in attrs)

    counts: dict[tuple, int] = {}
    for s in scene:
        counts[key(s)] = counts.get(key(s), 0) + 1
    return [s for s in scene if counts[key(s)] == 1]


def _question(
    rng: np.random.Generator, qtype: str, absent: bool | None, objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS)
) -> tuple[tuple[Shape, ...], int | None, str, str]:
    """Draw a scene of ``objects`` (min, max) objects (and a sign number for ``read``) and a question of ``qtype``
    well defined on it."""
    for _ in range(_MAX_ATTEMPTS):
        sign = qtype == "read" or rng.random() < 0.3  # signs appear in other questions too: a distractor
        n = int(rng.integers(objects[0], objects[1] + 1))
        scene = _random_scene(rng, n, sign)
        number = int(rng.integers(0, 1000)) if sign else None
        if qtype == "count":
            variant = int(rng.integers(3))
            if variant == 0:
                return scene, number, _COUNT_ALL_Q[0], str(len(scene))
            if variant == 1:
                color = str(_pick(rng, [s.color for s in scene]))
                return scene, number, _COUNT_COLOR_Q[0].format(color=color), str(sum(s.color == color for s in scene))
            kind = str(_pick(rng, [s.kind for s in scene]))
            q = _COUNT_KIND_Q[0].format(plural=PLURALS[kind])
            return scene, number, q, str(sum(s.kind == kind for s in scene))
        if qtype == "relation":
            anchors = _unique(scene, color="", kind="")
            if not anchors:
                continue
            anchor = _pick(rng, anchors)
            answers = {d: _neighbour(scene, anchor, d) for d in _DIRECTIONS}
            filled = [d for d, a in answers.items() if a != "nothing"]
            # "nothing" is a fair answer 1 time in 6, not the majority it would be by chance on a sparse grid
            if not filled and rng.random() >= 1 / 6:
                continue
            direction = str(_pick(rng, filled if filled and rng.random() >= 1 / 6 else list(_DIRECTIONS)))
            answer = answers[direction]
            q = _RELATION_Q[0].format(direction=direction, color=anchor.color, kind=anchor.kind)
            return scene, number, q, answer
        if qtype == "binding":
            if rng.random() < 0.5:
                targets = _unique(scene, size="", kind="")
                if not targets:
                    continue
                t = _pick(rng, targets)
                return scene, number, _BINDING_COLOR_Q[0].format(size=t.size, kind=t.kind), t.color
            targets = _unique(scene, size="", color="")
            if not targets:
                continue
            t = _pick(rng, targets)
            return scene, number, _BINDING_KIND_Q[0].format(size=t.size, color=t.color), t.kind
        if qtype == "caption":
            return scene, number, _CAPTION_Q[0], caption(scene)
        if qtype == "read":
            return scene, number, _READ_Q[0], str(number)
        if qtype == "exist":
            q, answer = _exist_question(rng, scene, bool(absent))
            return scene, number, q, answer
        raise ValueError(f"unknown qtype {qtype!r}")
    raise RuntimeError(f"could not draw a well-defined {qtype} question in {_MAX_ATTEMPTS} tries")  # pragma: no cover


def _neighbour(scene: tuple[Shape, ...], anchor: Shape, direction: str) -> str:
    """The nearest object from ``anchor`` along ``direction`` in its row or column, or ``nothing``."""
    dr, dc = _DIRECTIONS[direction]
    by_cell = {(s.row, s.col): s for s in scene}
    r, c = anchor.row + dr, anchor.col + dc
    while 0 <= r < GRID and 0 <= c < GRID:
        if (r, c) in by_cell:
            return describe(by_cell[(r, c)])
        r, c = r + dr, c + dc
    return "nothing"


def _exist_question(rng: np.random.Generator, scene: tuple[Shape, ...], absent: bool) -> tuple[str, str]:
    present = {(s.color, s.kind) for s in scene}
    if absent:
        candidates = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
        if rng.random() < 0.5:  # adversarial: shares a colour or a kind with an object in the image
            near = [(c, k) for c, k in candidates if k in {s.kind for s in scene} or c in {s.color for s in scene}]
            candidates = near or candidates
        color, kind = _pick(rng, candidates)
    else:
        target = _pick(rng, scene)
        color, kind = target.color, target.kind
    return _EXIST_Q[0].format(a=article(color), color=color, kind=kind), "no" if absent else "yes"


# ----------------------------------------------------------------------------------------------------- drawing


def render(scene: Iterable[Shape], number: int | None, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` (and a sign with ``number``): tinted background, jittered small objects, faint noise."""
    s = IMAGE_SIZE * _SUPERSAMPLE
    cell = s / GRID
    base = rng.integers(195, 240)
    img = Image.new("RGB", (s, s), tuple(int(np.clip(base + rng.integers(-12, 13), 0, 255)) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for shape in scene:
        r = cell * (0.34 if shape.size == "large" else 0.2)
        slack = cell / 2 - r - _SUPERSAMPLE
        cx = (shape.col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (shape.row + 0.5) * cell + rng.uniform(-slack, slack)
        fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[shape.color])
        _draw_shape(draw, shape.kind, cx, cy, r, fill)
    if number is not None:
        _draw_sign(draw, number, cell, rng)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, _NOISE_STD, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _draw_sign(draw: ImageDraw.ImageDraw, number: int, cell: float, rng: np.random.Generator) -> None:
    """A white board with a dark border and the number in black, somewhere in the bottom-right 2x2 cells."""
    left, top = 4 * cell + rng.uniform(0, 0.25 * cell), 4 * cell + rng.uniform(0, 0.6 * cell)
    width, height = 1.7 * cell, 1.1 * cell
    draw.rectangle((left, top, left + width, top + height), fill=(250, 250, 250), outline=(60, 60, 60),
                   width=_SUPERSAMPLE * 2)  # fmt: skip
    font = ImageFont.load_default(size=int(0.8 * cell))
    text = str(number)
    box = draw.textbbox((0, 0), text, font=font)
    x = left + (width - (box[2] - box[0])) / 2 - box[0]
    y = top + (height - (box[3] - box[1])) / 2 - box[1]
    draw.text((x, y), text, fill=(20, 20, 20), font=font)


# ----------------------------------------------------------------------------------------------------- samples


def qtype_for_index(index: int) -> tuple[str, bool | None]:
    """Round-robin question types; every other ``exist`` question asks about an absent object (balanced)."""
    qtype = QTYPES[index % len(QTYPES)]
    absent = (index // len(QTYPES)) % 2 == 1 if qtype == "exist" else None
    return qtype, absent


def generate_sample(
    seed: int,
    index: int,
    attempt: int = 0,
    objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
    qtype: tuple[str, bool | None] | None = None,
) -> Sample:
    """Sample ``index`` of the split drawn with ``seed``; ``attempt`` > 0 redraws it (de-duplication). ``objects``:
    the range of a scene's object count (the shipped splits use the default; a training curriculum may start with
    fewer). ``qtype``: (question type, absent) instead of the round robin's (a training mix may weight the types;
    the shipped splits keep the round robin)."""
    rng = np.random.default_rng([seed, index, attempt, 2])
    qtype, absent = qtype or qtype_for_index(index)
    if qtype not in QTYPES:
        raise ValueError(f"unknown qtype {qtype!r}: expected one of {QTYPES}")
    scene, number, question, answer = _question(rng, qtype, absent, objects)
    png = _png(render(scene, number, rng))
    return Sample(id=f"scenes-s{seed}-{index:06d}", seed=seed, index=index, qtype=qtype, question=question,
                  answer=answer, scene=scene, png=png, absent=absent, number=number)  # fmt: skip


def generate_split(seed: int, n: int, exclude: set[str] | None = None) -> list[Sample]:
    """``n`` samples from ``seed``, each redrawn while its key is in ``exclude`` or already drawn."""
    return draw_unique(seed, n, lambda i, attempt: generate_sample(seed, i, attempt), exclude)


def write_split(out_dir: str | Path, seed: int, n: int, force: bool = False, exclude: set[str] | None = None) -> Path:
    """Generate a split and write it atomically as ``out_dir/data.jsonl`` + ``out_dir/images/*.png``."""
    check_dataset_output(out_dir, force)  # before spending time generating
    return write_jsonl_dataset(out_dir, ((to_record(s), s.png) for s in generate_split(seed, n, exclude)), force=force)


def write_shipped_splits(
    out_root: str | Path, sizes: dict[str, int] | None = None, force: bool = False
) -> dict[str, Path]:
    """train / val / test from :data:`SPLIT_SEEDS`, each de-duplicated against the ones before it."""
    root = Path(out_root)
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    for name in SPLIT_SEEDS:
        check_dataset_output(root / name, force)
    taken: set[str] = set()
    paths = {}
    for name in ("train", "val", "test"):
        samples = generate_split(SPLIT_SEEDS[name], sizes[name], exclude=taken)
        taken.update(s.key for s in samples)
        paths[name] = write_jsonl_dataset(root / name, ((to_record(s), s.png) for s in samples), force=force)
    return paths
