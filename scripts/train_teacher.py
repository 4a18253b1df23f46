"""Train the shipped small teacher from scratch: a real ``LlavaForConditionalGeneration`` on the shapes task, on CPU.

Why from scratch: compression stages need a teacher that has *learned* the task (so distill/prune/quantize can
lose accuracy, and tests can catch it), small enough to train on a laptop CPU and to export in seconds.

Model: CLIP-style vision tower (``CLIPVisionConfig``) + 2-layer GELU projector + Llama decoder with GQA
(``LlamaConfig``), ~5.5M parameters. Patch 32 at 96 px gives 3x3 image tokens, one per cell of the task's grid:
each shape lies inside one patch. With patch 16 every shape straddles four patches (cell centres fall on patch
corners), training ran at half the steps/s and needed ~2x the steps for the same loss (measured, 1 thread, batch 32:
patch 16 reached 36% val exact match after 12.5 min, patch 32 reached 37% after 4.5 min).

Recipe (chosen with ``scripts/sweep_teacher.py`` on a GPU, same sample stream for every recipe; val exact match
after ~3600 steps of batch 32): trained on the language loss alone, every recipe stalled between 38% and 66%
(learning rates 2e-4..1e-3, batch 32/64, wider or deeper towers, patch 16, a wider or deeper decoder): the vision
tower learned colour and place but not shape. The auxiliary per-cell loss (:class:`CellProbe`, weight 3) reached
97% by step 3900; weights 1 and 0.3 reached 94% and 81%. Default: weight 3, lr 2e-4, 7000 cosine steps.
The output directory is always a loadable Hugging Face checkpoint
(``LlavaForConditionalGeneration.from_pretrained`` / ``LlavaProcessor.from_pretrained``) plus ``trainer_state.json``
and ``optimizer.pt`` for ``--resume``; every save is written to a temporary sibling and swapped in.

Data: samples are generated on the fly from the train seed (sample ``i`` is a pure function of (seed, i)), so
training needs no dataset on disk and resuming at step ``k`` replays exactly the same batches. Loss is on the answer
tokens (and the closing eos) only. Evaluation uses teacher forcing: "argmax is right at every answer position" is
equivalent to greedy decoding producing exactly the answer, at the cost of one forward pass.

Example (the full run)::

    python scripts/train_teacher.py -o runs/teacher --threads 2

Resume an interrupted run with the same command plus ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from edgelvm.data import scenes as sc
from edgelvm.data import shapes as sh
from edgelvm.data.vocab_tokenizer import SHAPES_CHAT_TEMPLATE, build_shapes_tokenizer

log = logging.getLogger("train_teacher")


@dataclass(frozen=True)
class Task:
    """What differs between the two synthetic tasks: how samples are drawn, the grid the cell probe labels, the
    answer length ``generate`` must allow, and which sample attributes the probe reads."""

    name: str
    grid: int
    image_size: int
    split_seeds: dict[str, int]
    split_sizes: dict[str, int]
    max_new_tokens: int

    def sample(
        self, seed: int, index: int, image_size: int, attempt: int = 0, max_objects: int = 0, qtype=None
    ) -> sh.Sample:
        """``max_objects`` > 0 (scenes only): scenes of 1 to that many objects (a curriculum's easy phase);
        ``qtype`` (scenes only): (type, absent) instead of the round robin's (a weighted question mix)."""
        if self.name == "shapes":
            return sh.generate_sample(seed, index, image_size, attempt)
        objects = (1, max_objects) if max_objects else (sc.MIN_OBJECTS, sc.MAX_OBJECTS)
        return sc.generate_sample(seed, index, attempt, objects=objects, qtype=qtype)

    def split(self, name: str, image_size: int) -> list[sh.Sample]:
        seed, n = self.split_seeds[name], self.split_sizes[name]
        return sh.generate_split(seed, n, image_size) if self.name == "shapes" else sc.generate_split(seed, n)


TASKS: dict[str, Task] = {
    "shapes": Task("shapes", sh.GRID, sh.DEFAULT_IMAGE_SIZE, sh.SPLIT_SEEDS, sh.SPLIT_SIZES, 24),
    # captions list up to 14 objects: "a red circle," is 4 tokens
    "scenes": Task("scenes", sc.GRID, sc.IMAGE_SIZE, sc.SPLIT_SEEDS, sc.SPLIT_SIZES, 64),
}


@dataclass
class TrainConfig:
    out: str = "runs/teacher"
    task: str = "shapes"
    steps: int = 7000
    batch_size: int = 32
    lr: float = 2e-4  # 5e-4 stalled at ~35% val (colour at chance) for 1500 steps; 2e-4 had colour at 57% by step 500
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    threads: int = 1
    image_size: int = 0  # 0: the task's own (96 px shapes, 192 px scenes)
    patch_size: int = 32  # 96/32 = 3: one image token per grid cell (see the module docstring)
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 704
    cell_loss: float = 3.0  # weight of the auxiliary per-cell kind/colour loss on the vision tokens (0: off)
    train_size: int = 0  # 0: an endless stream of fresh train-seed samples; N: cycle through the first N
    eval_every: int = 250
    eval_n: int = 500
    save_every: int = 250
    log_every: int = 20
    seed: int = 0
    answer_weight: str = "mean"  # "mean": every answer token counts once; "sqrt": a sample weighs sqrt(its tokens)
    max_minutes: float = 0.0  # > 0: save and stop after this much wall time (resume later with --resume)
    # a curriculum (scenes): batches before step easy_until draw scenes of 1 to easy_objects objects. Why: at 4-14
    # objects the scenes teacher answered existence at chance for 2400 steps (yes - no logit 0.05 +- 0.04 whatever
    # the answer) while reading the sign rose to 53%: the decoder had not found the content lookup
    easy_until: int = 0
    easy_objects: int = 3
    # > 0: weight of a word-aligned cell loss (:class:`WordAlignment`): each occupied cell's image token, after the
    # projector, must be closest (cosine) to the input embeddings of its own colour, kind and size words
    align_loss: float = 0.0
    # scenes: question types drawn with these weights ("exist:3,relation:2,...", unnamed types weigh 0) instead of
    # the round robin; existence stays balanced. Why: at step 4717 the teacher captioned 94% and read 95% but
    # answered existence at chance (yes - no logit 0.03 whatever the answer, even on 1-3-object scenes) and binding /
    # relation / count below 50% — the content lookups had a sixth of the batch each and one answer token
    qtype_mix: str = ""
    # scenes, > 0: weight of an attention target (:class:`LookupAttention`): one head of one decoder layer, at the
    # last prompt position, must put its mass on the objects the question names (on the BOS token when none exists)
    lookup_loss: float = 0.0
    lookup_layer: int = 2

    @property
    def spec(self) -> Task:
        return TASKS[self.task]


# ------------------------------------------------------------------------------------------------ model + processor


def build_processor(cfg: TrainConfig, tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": cfg.image_size},
        do_center_crop=True,
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        do_normalize=True,
        image_mean=list(sh.IMAGE_MEAN),
        image_std=list(sh.IMAGE_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=SHAPES_CHAT_TEMPLATE,
        image_token="<image>",
    )


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.vision_hidden,
        intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        projection_dim=cfg.text_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    n_img = (cfg.image_size // cfg.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.image_token_id,  # transformers 5 name; the old image_token_index is ignored
        image_seq_length=n_img,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # a from-scratch tower: its last layer is the one trained for this
    )
    config.pad_token_id = tokenizer.pad_token_id
    # A wrong id does not fail: transformers just finds no placeholders and the model trains blind.
    assert config.image_token_id == tokenizer.image_token_id, "image features would never reach the language model"
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    gc.do_sample, gc.max_new_tokens = False, cfg.spec.max_new_tokens
    return model


# ------------------------------------------------------------------------------------------------------ batches


class Batcher:
    """Turns samples into model inputs; the token layout is checked once against ``LlavaProcessor``."""

    def __init__(self, processor, n_image_tokens: int) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.n_img = n_image_tokens
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def prompt_text(self, question: str) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, question: str) -> list[int]:
        t = self.tok
        ids = [t.bos_token_id, t.convert_tokens_to_ids("<|user|>")] + [t.image_token_id] * self.n_img
        ids += self._ids(question)
        return [*ids, t.convert_tokens_to_ids("<|end|>"), t.convert_tokens_to_ids("<|assistant|>")]

    def check_against_processor(self, sample: sh.Sample) -> None:
        out = self.processor(images=[sample.image], text=[self.prompt_text(sample.question)], return_tensors="pt")
        ref = out["input_ids"][0].tolist()
        if ref != self.prompt_ids(sample.question):
            raise AssertionError(
                f"token layout differs from LlavaProcessor:\n{ref}\n{self.prompt_ids(sample.question)}"
            )

    def pixels(self, samples: list[sh.Sample]) -> torch.Tensor:
        return self.processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]

    def train_batch(self, samples: list[sh.Sample]) -> dict[str, torch.Tensor]:
        """Right-padded; labels = answer + eos, everything else -100."""
        return self.text_batch(samples) | {"pixel_values": self.pixels(samples)}

    def text_batch(self, samples) -> dict[str, torch.Tensor]:
        """The token half of :meth:`train_batch` (needs only ``.question`` and ``.answer``)."""
        seqs, labels = [], []
        for s in samples:
            p = self.prompt_ids(s.question)
            a = [*self._ids(s.answer), self.tok.eos_token_id]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        return self._pad(seqs, labels)

    def _pad(self, seqs: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        n = max(map(len, seqs))
        pad = self.tok.pad_token_id
        ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (n - len(s)) for s in labels])
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}


class CellProbe(torch.nn.Module):
    """Training-only heads that read each grid cell's kind and colour off the vision tower's patch tokens.

    Why: trained only through the language loss, the vision tower learned colour and place (linear in the pixels)
    but not shape (measured: colour questions, which need the shape, stalled near 65% for every recipe swept). Real
    LLaVA starts from a pretrained CLIP tower; this is the shapes task's equivalent, run jointly: with one patch per
    grid cell (patch 32 at 96 px for shapes, at 192 px for scenes), patch token ``i`` is grid cell ``i``, so each
    token gets a direct label (kind or empty, colour or empty; on scenes also size) from the scene. On scenes a sign
    head reads the number's digits off the mean of the sign's 2x2 cells (the sign sits there when present). The
    probe is never saved in the model: the shipped checkpoint is a plain ``LlavaForConditionalGeneration``.
    """

    DIGIT_SLOTS = 3  # units, tens, hundreds; class 10 = "no digit" (shorter number or no sign)

    def __init__(self, hidden: int, task: str) -> None:
        super().__init__()
        self.task = task
        self.kind = torch.nn.Linear(hidden, len(sh.KINDS) + 1)
        self.color = torch.nn.Linear(hidden, len(sh.COLORS) + 1)
        if task == "scenes":
            self.size = torch.nn.Linear(hidden, len(sh.SIZES) + 1)
            self.digits = torch.nn.Linear(hidden, self.DIGIT_SLOTS * 11)
            grid = sc.GRID
            self.sign_cells = sorted(r * grid + c for r, c in sc.SIGN_CELLS)

    def loss(self, patch_tokens: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy
        heads = ["kind", "color"] + (["size"] if self.task == "scenes" else [])
        terms = [ce(getattr(self, h)(patch_tokens).flatten(0, 1), labels[h].flatten()) for h in heads]
        if self.task == "scenes":
            sign = patch_tokens[:, self.sign_cells].mean(dim=1)
            terms.append(ce(self.digits(sign).view(-1, 11), labels["digits"].flatten()))
        return sum(terms) / len(terms)


class WordAlignment:
    """A loss that puts each occupied cell's image token (the projector's output, in the language model's embedding
    space) next to the input embeddings of the words that describe it: cosine similarity x 10 against the colour,
    kind and size words, cross-entropy on the cell's own. No parameters of its own: it shapes the tower, the
    projector and the word embeddings.

    Why: after 2400 steps the scenes teacher answered every existence question alike (``yes`` - ``no`` logit 0.05 ±
    0.04), even on one-object scenes where it could already name the object (captions, binding): it never learned to
    compare the question's words with the image's tokens. Image tokens that live next to their words (what LLaVA's
    projector pretraining on captions gives a real model) make that comparison a dot product in attention."""

    TEMPERATURE = 10.0

    def __init__(self, task: str, model) -> None:
        tokenizer = build_shapes_tokenizer(task)
        bare = set(tokenizer("", add_special_tokens=False)["input_ids"]) | set(tokenizer.convert_tokens_to_ids(["▁"]))

        def word_id(word: str) -> int:
            ids = [i for i in tokenizer(word, add_special_tokens=False)["input_ids"] if i not in bare]
            if len(ids) != 1:
                raise SystemExit(f"--align-loss: {word!r} is not one token of the {task} tokenizer ({ids})")
            return ids[0]

        self.words = {
            "color": [word_id(w) for w in sh.COLORS],
            "kind": [word_id(w) for w in sh.KINDS],
            **({"size": [word_id(w) for w in sh.SIZES]} if task == "scenes" else {}),
        }
        self.task = task
        self._projected: torch.Tensor | None = None
        model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: setattr(self, "_projected", out))

    def loss(self, model, samples) -> torch.Tensor:
        tokens, self._projected = self._projected, None
        labels = cell_labels(samples, self.task)
        table = model.get_input_embeddings().weight
        cells = torch.nn.functional.normalize(tokens.float(), dim=-1)
        terms = []
        for head, ids in self.words.items():
            words = torch.nn.functional.normalize(table[ids].float(), dim=-1)
            logits = self.TEMPERATURE * cells @ words.T  # [B, cells, classes]
            target = labels[head].to(logits.device)
            occupied = target < len(ids)  # the last class is "empty": no word to be near
            terms.append(torch.nn.functional.cross_entropy(logits[occupied], target[occupied]))
        return sum(terms) / len(terms)


class LookupAttention:
    """Training-only: head 0 of decoder layer ``layer``, at the last prompt position (the one that predicts the
    answer), must put its attention on the image tokens of the objects the question names
    (:func:`edgelvm.data.scenes.referents`), or on the BOS token when the question names an object that is not
    there; ``-log`` of the mass there, averaged over the questions that name objects (not captions or signs).

    Why: at step 5100 (4 recipe changes in) the teacher answered existence at chance — the ``yes`` - ``no`` logit
    gap 0.03 whatever the answer, even on 1-3-object scenes and with existence oversampled 3x — while it captioned
    89%: it reads the image in order but never looks an object up by the question's words. Attention that finds
    the named object, with BOS as the "nothing there" sink, is the lookup those answers need (binding, counting and
    the relation's anchor too). The loss needs the attention weights, so the text model runs eager attention while
    it is on (``sdpa`` returns none); the saved checkpoint is unchanged."""

    HEAD = 0

    def __init__(self, model, layer: int) -> None:
        layers = model.config.text_config.num_hidden_layers
        if not 0 <= layer < layers:
            raise SystemExit(f"--lookup-layer {layer}: the text model has layers 0..{layers - 1}")
        self.layer = layer
        self.image_token = model.config.image_token_index
        self.text_config = model.config.text_config

    def targets(self, samples, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[int], list]:
        """(rows, query positions, key positions) of the samples whose question names objects."""
        rows, queries, keys = [], [], []
        for row, sample in enumerate(samples):
            named = sc.referents(sample.qtype, sample.question, sample.scene)
            if named is None:
                continue
            cells = torch.nonzero(input_ids[row] == self.image_token).flatten().tolist()
            rows.append(row)
            queries.append(int(torch.nonzero(labels[row] != -100)[0]) - 1)
            keys.append([cells[s.row * sc.GRID + s.col] for s in named] if named else [0])
        return rows, queries, keys

    def forward(self, model, batch: dict):
        """The model's outputs with attention weights (eager attention for this call only)."""
        saved = self.text_config._attn_implementation
        self.text_config._attn_implementation = "eager"
        try:
            return model(**batch, output_attentions=True)
        finally:
            self.text_config._attn_implementation = saved

    def loss(self, attentions, samples, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, queries, keys = self.targets(samples, input_ids, labels)
        if not rows:
            return torch.zeros(())
        weights = attentions[self.layer][:, self.HEAD]  # [B, query, key]
        terms = [-torch.log(weights[r, q, k].sum() + 1e-6) for r, q, k in zip(rows, queries, keys, strict=True)]
        return torch.stack(terms).mean()


def cell_labels(samples, task: str = "shapes") -> dict[str, torch.Tensor]:
    """Per-cell class ids in patch order (row-major; the last class of each means "empty"), and on scenes the
    sign's digits (units first; 10 = none)."""
    grid = TASKS[task].grid
    colors = list(sh.COLORS)
    n = grid * grid
    out = {
        "kind": torch.full((len(samples), n), len(sh.KINDS), dtype=torch.long),
        "color": torch.full((len(samples), n), len(colors), dtype=torch.long),
    }
    if task == "scenes":
        out["size"] = torch.full((len(samples), n), len(sh.SIZES), dtype=torch.long)
        out["digits"] = torch.full((len(samples), CellProbe.DIGIT_SLOTS), 10, dtype=torch.long)
    for b, sample in enumerate(samples):
        for shape in sample.scene:
            cell = shape.row * grid + shape.col
            out["kind"][b, cell] = sh.KINDS.index(shape.kind)
            out["color"][b, cell] = colors.index(shape.color)
            if task == "scenes":
                out["size"][b, cell] = sh.SIZES.index(shape.size)
        number = getattr(sample, "number", None)
        if task == "scenes" and number is not None:
            for slot, digit in enumerate(reversed(str(number))):
                out["digits"][b, slot] = int(digit)
    return out


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted token losses, sum of weights) over the answer tokens of a batch.

    ``mean``: every answer token weighs 1 (the usual LM loss). ``sqrt``: the tokens of a sample with ``n`` answer
    tokens weigh ``1/sqrt(n)`` each, so a 40-token caption does not drown the one-digit counts in its batch.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    n = mask.sum(dim=1, keepdim=True).clamp(min=1).float()
    w = mask.float() * (n.rsqrt() if weighting == "sqrt" else 1.0)
    return (ce * w).sum(), w.sum()


class TeacherLoss:
    """Language-model loss on the answer, plus ``cfg.cell_loss`` x the :class:`CellProbe` loss."""

    def __init__(self, cfg: TrainConfig, model) -> None:
        self.weight = cfg.cell_loss
        self.task = cfg.task
        self.weighting = cfg.answer_weight
        self.probe = None
        self._tokens: torch.Tensor | None = None
        self.align_weight = cfg.align_loss
        self.alignment = WordAlignment(cfg.task, model) if cfg.align_loss > 0 else None
        self.lookup_weight = cfg.lookup_loss
        if cfg.lookup_loss > 0 and cfg.task != "scenes":
            raise SystemExit("--lookup-loss needs --task scenes (its questions name objects to look up)")
        self.lookup = LookupAttention(model, cfg.lookup_layer) if cfg.lookup_loss > 0 else None
        if self.weight > 0:
            grid = cfg.spec.grid
            if cfg.image_size // cfg.patch_size != grid:
                raise SystemExit(f"--cell-loss needs one patch per grid cell: --patch-size {cfg.image_size // grid}")
            self.probe = CellProbe(cfg.vision_hidden, cfg.task)
            tower = model.model.vision_tower
            tower.register_forward_hook(lambda _m, _i, out: setattr(self, "_tokens", out.last_hidden_state[:, 1:]))

    def parameters(self):
        return [] if self.probe is None else list(self.probe.parameters())

    def to(self, device) -> TeacherLoss:
        if self.probe is not None:
            self.probe.to(device)
        return self

    def answer_weight(self, labels: torch.Tensor) -> float:
        """The batch's total answer-token weight (see :func:`answer_loss`), to normalise its parts by."""
        mask = labels[:, 1:] != -100
        n = mask.sum(dim=1).clamp(min=1).float()
        return float(n.sqrt().sum() if self.weighting == "sqrt" else n.sum())

    def __call__(self, model, batch: dict, samples, norm: float | None = None, share: float = 1.0):
        """(total loss, language loss) of ``batch``, a ``share`` of the samples of a batch whose total answer
        weight is ``norm`` (default: this batch alone)."""
        batch = dict(batch)
        labels = batch.pop("labels")
        out = self.lookup.forward(model, batch) if self.lookup else model(**batch)
        total, weight = answer_loss(out.logits, labels, self.weighting)
        lm = total / (weight if norm is None else norm)
        extra = self.align_weight * share * self.alignment.loss(model, samples) if self.alignment else 0.0
        if self.lookup:
            lookup = self.lookup.loss(out.attentions, samples, batch["input_ids"], labels)
            extra = extra + self.lookup_weight * share * lookup
        if self.probe is None:
            return lm + extra, lm
        labels = {k: v.to(lm.device) for k, v in cell_labels(samples, self.task).items()}
        aux = self.probe.loss(self._tokens, labels)
        self._tokens = None
        return lm + self.weight * share * aux + extra, lm


def train_samples(cfg: TrainConfig, step: int, held_out: set[str]) -> list[sh.Sample]:
    """Batch ``step`` (deterministic, so resume replays the same data). A sample identical (image bytes +
    question) to a held-out val/test sample is redrawn, so the stream never trains on evaluation data."""
    start = step * cfg.batch_size
    idx = range(start, start + cfg.batch_size)
    if cfg.train_size:
        idx = [i % cfg.train_size for i in idx]
    task = cfg.spec
    seed = task.split_seeds["train"]
    easy = cfg.easy_objects if step < cfg.easy_until else 0
    mix = parse_qtype_mix(cfg.qtype_mix) if cfg.qtype_mix else None
    out = []
    for i in idx:
        attempt = 0
        qtype = draw_qtype(mix, seed, i) if mix else None
        s = task.sample(seed, i, cfg.image_size, max_objects=easy, qtype=qtype)
        while s.key in held_out:
            attempt += 1
            log.warning("train sample %d equals a held-out sample; redrawing", i)
            s = task.sample(seed, i, cfg.image_size, attempt, max_objects=easy, qtype=qtype)
        out.append(s)
    return out


def parse_qtype_mix(text: str) -> dict[str, float]:
    """``"exist:3,relation:2"`` -> normalised weights over the scenes question types (unnamed ones weigh 0)."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.strip().partition(":")
        if name not in sc.QTYPES:
            raise SystemExit(f"--qtype-mix: unknown question type {name!r}; expected some of {sc.QTYPES}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise SystemExit(f"--qtype-mix: {part!r} needs a weight, e.g. {name}:2") from None
        if weights[name] < 0:
            raise SystemExit(f"--qtype-mix: {name} has a negative weight")
    total = sum(weights.values())
    if total <= 0:
        raise SystemExit("--qtype-mix: every weight is 0")
    return {k: v / total for k, v in weights.items()}


def draw_qtype(mix: dict[str, float], seed: int, index: int) -> tuple[str, bool | None]:
    """The (type, absent) of training sample ``index``: deterministic, so resume replays the same stream."""
    rng = np.random.default_rng([seed, index, 7])
    names = sorted(mix)
    qtype = names[int(rng.choice(len(names), p=[mix[n] for n in names]))]
    return qtype, bool(rng.random() < 0.5) if qtype == "exist" else None


# ------------------------------------------------------------------------------------------------------ evaluate


@torch.no_grad()
def evaluate(model, batcher: Batcher, samples: list[sh.Sample], batch_size: int = 50) -> dict[str, float]:
    """Exact match per qtype via teacher forcing (== greedy exact match, see the module docstring)."""
    model.eval()
    hits: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        batch = batcher.train_batch(chunk)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        pred = logits[:, :-1].argmax(-1)
        tgt = labels[:, 1:]
        ok = ((pred == tgt) | (tgt == -100)).all(dim=1)
        for s, good in zip(chunk, ok.tolist(), strict=True):
            total[s.qtype] += 1
            hits[s.qtype] += int(good)
    model.train()
    acc = {q: hits[q] / total[q] for q in sorted(total)}
    acc["all"] = sum(hits.values()) / sum(total.values())
    return acc


@torch.no_grad()
def generate_answers(model, batcher: Batcher, samples: list[sh.Sample], max_new_tokens: int = 24) -> list[str]:
    """Real greedy ``generate`` (left-padded), used to confirm the teacher-forced numbers at the end."""
    model.eval()
    tok = batcher.tok
    seqs = [batcher.prompt_ids(s.question) for s in samples]
    n = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (n - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
    out = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=batcher.pixels(samples), max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    model.train()
    return [tok.decode(o[n:], skip_special_tokens=True) for o in out]


# ------------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(out: Path, model, processor, optimizer, state: dict, probe=None) -> None:
    """Write to a temporary sibling, then swap: a crash mid-save leaves the previous checkpoint intact."""
    from edgelvm.fsutil import write_dir_atomically

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if probe is not None:  # training state like optimizer.pt: needed by --resume, not part of the model
            torch.save(probe.state_dict(), tmp / "cell_probe.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

    write_dir_atomically(out, write)


def length_groups(samples: list[sh.Sample]) -> list[list[sh.Sample]]:
    """Split a batch in two where its longest answers are much longer than the typical one (scenes captions are
    ~40 tokens, most answers 1-3): each part is padded to its own length. One part when lengths are even."""
    lengths = [len(s.answer) for s in samples]  # characters: a proxy for tokens, good enough to group by
    cut = 2 * sorted(lengths)[len(lengths) // 2] + 24
    long = [s for s, n in zip(samples, lengths, strict=True) if n > cut]
    short = [s for s, n in zip(samples, lengths, strict=True) if n <= cut]
    return [g for g in (short, long) if g]


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ------------------------------------------------------------------------------------------------------ main


def train(cfg: TrainConfig, resume: bool) -> dict:
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if cfg.task not in TASKS:
        raise SystemExit(f"--task {cfg.task!r}: expected one of {sorted(TASKS)}")
    task = cfg.spec
    cfg.image_size = cfg.image_size or task.image_size
    tokenizer = build_shapes_tokenizer(task.name)
    processor = build_processor(cfg, tokenizer)
    state: dict = {"step": 0, "history": [], "config": asdict(cfg), "elapsed_s": 0.0}
    if resume and (out / "trainer_state.json").is_file():
        state = json.loads((out / "trainer_state.json").read_text())
        saved = TrainConfig(**state["config"])
        for k in ("task", "image_size", "patch_size", "vision_hidden", "vision_layers", "text_hidden", "text_layers"):
            if getattr(saved, k) != getattr(cfg, k):
                raise SystemExit(f"--resume: {k}={getattr(cfg, k)} but the checkpoint has {getattr(saved, k)}")
        model = LlavaForConditionalGeneration.from_pretrained(out)
        changed = {k: [v, getattr(cfg, k)] for k, v in asdict(saved).items() if v != getattr(cfg, k)}
        if changed:  # e.g. a longer --steps: the schedule continues on the new length (a warm restart of the cosine)
            state.setdefault("resumes", []).append({"step": state["step"], "changed": changed})
            state["config"] = asdict(cfg)
        log.info("resuming from %s at step %d%s", out, state["step"], f" with {changed}" if changed else "")
    else:
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"{out} is not empty: pass --resume to continue it, or choose another --out")
        model = build_model(cfg, tokenizer)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    vision_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    log.info("model: %.2fM parameters (vision %.2fM), vocab %d", n_params / 1e6, vision_params / 1e6, len(tokenizer))

    n_img = (cfg.image_size // cfg.patch_size) ** 2
    batcher = Batcher(processor, n_img)
    val = task.split("val", cfg.image_size)
    test = task.split("test", cfg.image_size)
    held_out = {s.key for s in val + test}
    val = val[: cfg.eval_n]
    batcher.check_against_processor(val[0])

    loss_fn = TeacherLoss(cfg, model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    decay += loss_fn.parameters()
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    if resume and (out / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True))
        if loss_fn.probe is not None:
            loss_fn.probe.load_state_dict(torch.load(out / "cell_probe.pt", weights_only=True))

    step = state["step"]
    t0 = time.time() - state["elapsed_s"]
    cpu0 = time.process_time() - state.get("cpu_s", 0.0)  # CPU seconds of every thread, across resumes
    smooth = None
    step0, t_start = step, time.time()
    while step < cfg.steps:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        samples = train_samples(cfg, step, held_out)
        optimizer.zero_grad(set_to_none=True)
        lm_loss = torch.zeros(())
        parts = [(part, batcher.train_batch(part)) for part in length_groups(samples)]
        norm = sum(loss_fn.answer_weight(b["labels"]) for _, b in parts)
        for part, b in parts:  # the gradient of one padded batch, without most of the padding
            loss, lm = loss_fn(model, b, part, norm=norm, share=len(part) / len(samples))
            loss.backward()
            lm_loss += lm.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        smooth = lm_loss.item() if smooth is None else 0.9 * smooth + 0.1 * lm_loss.item()
        if step % cfg.log_every == 0:
            el = time.time() - t0
            rate = (step - step0) / max(time.time() - t_start, 1e-9)
            log.info(
                "step %d/%d loss %.4f lr %.2e  %.2f steps/s  %.1f min",
                step,
                cfg.steps,
                smooth,
                lr_at(cfg, step),
                rate,
                el / 60,
            )
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = evaluate(model, batcher, val)
            state["history"].append({"step": step, "loss": smooth, "minutes": (time.time() - t0) / 60,
                                     "cpu_minutes": (time.process_time() - cpu0) / 60, "val": acc})  # fmt: skip
            log.info("step %d val exact match %s", step, " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        out_of_time = cfg.max_minutes > 0 and time.time() - t_start > 60 * cfg.max_minutes
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            state.update(step=step, elapsed_s=time.time() - t0, cpu_s=time.process_time() - cpu0)
            save_checkpoint(out, model, processor, optimizer, state, loss_fn.probe)
            log.info("saved %s (step %d)", out, step)
        if out_of_time:
            log.info("--max-minutes %.0f reached at step %d: continue with --resume", cfg.max_minutes, step)
            return state

    test_acc = evaluate(model, batcher, test)
    gen = generate_answers(model, batcher, test[:100], task.max_new_tokens)
    gen_acc = sum(g == s.answer for g, s in zip(gen, test[:100], strict=True)) / len(gen)
    state.update(test=test_acc, test_generate_100=gen_acc, elapsed_s=time.time() - t0,
                 cpu_s=time.process_time() - cpu0)  # fmt: skip
    save_checkpoint(out, model, processor, optimizer, state, loss_fn.probe)
    log.info(
        "test exact match %s | generate() on 100: %.3f", " ".join(f"{k} {v:.3f}" for k, v in test_acc.items()), gen_acc
    )
    return state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", default=TrainConfig.out)
    for f, default in asdict(TrainConfig()).items():
        if f != "out":
            p.add_argument("--" + f.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    train(TrainConfig(**args), resume)


if __name__ == "__main__":
    main()
