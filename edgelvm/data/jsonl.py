"""Image-text datasets in the LLaVA conversation format: read (validated) and write (atomically).

One JSON object per line::

    {"id": "...", "image": "images/x.png",
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}],
     "qtype": "color", ...metadata}

``image`` is relative to ``image_root`` (default: the jsonl's directory). Real LLaVA data (``llava_v1_5_mix665k``
and friends) reads too: ``qtype`` and ``id`` are optional, a record may have no image (text-only), a conversation
may have many turns, and a ``.json`` file holding one JSON array is accepted. Every problem is a
:class:`~edgelvm.errors.DatasetError` naming the file, the line and the fix, because a bad line found at step
3000 of a distillation run is expensive.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgelvm.errors import DatasetError
from edgelvm.fsutil import prepare_output, write_dir_atomically

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
DATA_FILE = "data.jsonl"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


@dataclass(frozen=True)
class VQARecord:
    """One record. ``question``/``answer`` are the first human/gpt turns (the question without ``<image>``)."""

    id: str
    image_path: Path | None  # absolute; None for a text-only record
    question: str
    answer: str
    conversations: tuple[dict[str, str], ...]
    qtype: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    source: str = ""  # "file:line", for error messages further down the pipeline

    @property
    def turns(self) -> list[tuple[str, str]]:
        """(role, text) pairs with roles normalised to ``user``/``assistant`` and the image marker removed."""
        return [(_role(c["from"]), strip_image_marker(c["value"])) for c in self.conversations]


def strip_image_marker(text: str) -> str:
    """Remove ``<image>`` and the newline LLaVA puts next to it (either side)."""
    return text.replace(IMAGE_MARKER + "\n", "").replace("\n" + IMAGE_MARKER, "").replace(IMAGE_MARKER, "").strip()


def _role(raw: str) -> str:
    if raw in HUMAN_ROLES:
        return "user"
    if raw in ASSISTANT_ROLES:
        return "assistant"
    return raw


def resolve_data_file(path: str | Path) -> Path:
    """A directory means ``<dir>/data.jsonl``; a file is used as is."""
    p = Path(path)
    if p.is_dir():
        f = p / DATA_FILE
        if not f.is_file():
            listing = sorted(x.name for x in p.iterdir())[:10]
            raise DatasetError(
                f"no {DATA_FILE} in this directory (found: {', '.join(listing) or 'nothing'})",
                where=p,
                fix=f"point at the .jsonl file itself, or create the dataset with `edgelvm data shapes -o {p}`",
            )
        return f
    if not p.exists():
        raise DatasetError(
            "dataset not found", where=p, fix="check the path (a directory holding data.jsonl, or a .jsonl file)"
        )
    return p


def _iter_raw(data_file: Path) -> Iterator[tuple[int, object]]:
    """(line number or array index, parsed object) pairs."""
    try:
        text = data_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"not UTF-8 text ({e})", where=data_file, fix="save the dataset as UTF-8 JSON lines") from e
    if data_file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}",
                where=data_file,
                fix="fix the JSON array, or convert it to JSON lines (one object per line)",
            ) from e
        yield from enumerate(items)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"line {lineno}: malformed JSON ({e.msg} at column {e.colno})",
                where=data_file,
                fix=f"make line {lineno} one complete JSON object; each record must fit on a single line",
            ) from e


def load_jsonl_dataset(
    path: str | Path, image_root: str | Path | None = None, check_images: bool = True
) -> list[VQARecord]:
    """Read and validate a dataset; ``path`` is a directory holding ``data.jsonl`` or a ``.jsonl``/``.json`` file."""
    data_file = resolve_data_file(path).resolve()
    root = Path(image_root).resolve() if image_root is not None else data_file.parent
    is_array = data_file.suffix == ".json"
    records = []
    for pos, obj in _iter_raw(data_file):
        where = f"{data_file}:{pos}" if not is_array else f"{data_file}[{pos}]"
        label = f"line {pos}" if not is_array else f"item {pos}"
        records.append(_parse_record(obj, where, label, root, check_images, data_file))
    if not records:
        raise DatasetError(
            "the dataset is empty (no records)",
            where=data_file,
            fix="add at least one record, or regenerate it with `edgelvm data shapes`",
        )
    logger.info("loaded %d records from %s", len(records), data_file)
    return records


def _parse_record(obj: object, where: str, label: str, root: Path, check_images: bool, data_file: Path) -> VQARecord:
    def bad(problem: str, fix: str) -> DatasetError:
        return DatasetError(f"{label}: {problem}", where=data_file, fix=fix)

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}", "each record must be a JSON object {...}")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise bad(
            "missing or empty field 'conversations'",
            'add "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]',
        )
    for i, turn in enumerate(convs):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise bad(
                f"conversations[{i}] must be an object with string fields 'from' and 'value'",
                'write each turn as {"from": "human"|"gpt", "value": "..."}',
            )
    question = next((c["value"] for c in convs if c["from"] in HUMAN_ROLES), None)
    answer = next((c["value"] for c in convs if c["from"] in ASSISTANT_ROLES), None)
    if question is None or answer is None:
        raise bad(
            "conversations need at least one human turn and one gpt turn",
            'use "from": "human" (or "user") for questions and "from": "gpt" (or "assistant") for answers',
        )
    image = obj.get("image")
    image_path = None
    if image is not None:
        if not isinstance(image, str) or not image:
            raise bad("field 'image' must be a non-empty string path", "give the image path relative to the dataset")
        image_path = (root / image).resolve()
        if check_images and not image_path.is_file():
            raise bad(
                f"image not found: {image_path}",
                f"put the image at that path, or fix the 'image' field (paths are relative to {root})",
            )
    qtype = obj.get("qtype")
    if qtype is not None and not isinstance(qtype, str):
        raise bad("field 'qtype' must be a string", 'drop it or make it a string such as "color"')
    rid = obj.get("id")
    meta = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations", "qtype")}
    return VQARecord(
        id=str(rid) if rid is not None else label.replace(" ", ""),
        image_path=image_path,
        question=strip_image_marker(question),
        answer=answer.strip(),
        conversations=tuple({"from": c["from"], "value": c["value"]} for c in convs),
        qtype=qtype,
        metadata=meta,
        source=where,
    )


# ------------------------------------------------------------------------------------------------------ writing


def write_jsonl_dataset(out_dir: str | Path, items: Iterable[tuple[dict, bytes]], force: bool = False) -> Path:
    """Write ``(record, image_bytes)`` pairs as ``out_dir/data.jsonl`` + ``out_dir/<record["image"]>``.

    Atomic (:func:`edgelvm.fsutil.write_dir_atomically`): an interrupted run never leaves a half-written dataset that
    later loads "fine". A non-empty ``out_dir`` is refused unless ``force``, and ``force`` replaces only a dataset
    edgelvm wrote (:func:`edgelvm.fsutil.prepare_output`).
    """
    out = check_dataset_output(out_dir, force)
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp / DATA_FILE, "w", encoding="utf-8") as f:
            for record, image_bytes in items:
                rel = Path(str(record["image"]))
                if rel.is_absolute() or ".." in rel.parts:
                    raise DatasetError(f"record {record.get('id')}: image path must be relative", where=rel)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(image_bytes)
                f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        if count == 0:
            raise DatasetError("refusing to write an empty dataset", where=out, fix="generate at least one sample")

    write_dir_atomically(out, write, stage="data")
    logger.info("wrote %d records to %s", count, out)
    return out


def check_dataset_output(out_dir: str | Path, force: bool) -> Path:
    """Refuse (before any work) an output that is a file, a non-empty directory without ``force``, or with
    ``force`` a directory edgelvm did not write; returns the path to write."""
    return prepare_output(out_dir, force=force, option="-o", error=DatasetError)
