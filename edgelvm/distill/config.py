"""``DistillConfig`` and ``DistillReport``: the distill stage's options and its result.

Each option's help lives in its field's metadata, from which ``edgelvm distill`` generates its options
(:mod:`edgelvm.cli_options`), so the CLI does not restate them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelvm.distill.losses import DIVERGENCES
from edgelvm.errors import ConfigError


def _opt(help: str, **cli: Any) -> dict[str, Any]:
    """Field metadata for :mod:`edgelvm.cli_options`: the help text ``edgelvm distill --help`` shows, and
    ``param`` / ``cli_default`` where the CLI names or defaults the option otherwise."""
    return {"help": help, **cli}


@dataclass
class TeacherAPIConfig:
    """A teacher reached only through an OpenAI-compatible chat-completions endpoint (``edgelvm serve``, vLLM,
    llama.cpp's server, a hosted model). It answers every training record once (cached on disk, resumable); the
    student then trains on its text (``ce_weight``) and, where the server returns ``top_logprobs`` and the teacher's
    tokenizer equals the student's, on its top-k log-probabilities (``kd_weight``).

    The API key is read from the environment variable ``api_key_env`` (never stored, never a flag)."""

    url: str = field(
        metadata=_opt(
            "The teacher is this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1); "
            "its API key is read from $EDGELVM_TEACHER_API_KEY.",
            param="teacher_api",
        )
    )
    model: str = field(metadata=_opt("The served model id."))
    api_key_env: str = field(default="EDGELVM_TEACHER_API_KEY", metadata={"cli": False})  # the key: never a flag
    temperature: float = field(default=0.0, metadata=_opt("Sampling temperature of the teacher's answers."))
    max_tokens: int = field(default=128, metadata=_opt("Longest answer asked for, in tokens."))
    top_logprobs: int = field(
        default=0,
        metadata=_opt(
            "Ask for top-k log-probabilities (token-level KD; 0: text only; the OpenAI API allows up to 20)."
        ),
    )
    tokenizer: str | None = field(
        default=None, metadata=_opt("The API teacher's tokenizer (dir or hub id), needed for token-level KD.")
    )
    cache: str | Path | None = field(
        default=None, metadata=_opt("Where answers are cached [default: OUT/.distill/teacher_api].")
    )
    concurrency: int = field(default=4, metadata=_opt("Requests in flight."))
    requests_per_second: float | None = field(
        default=10.0, metadata=_opt("Requests per second at most (0: no limit).", param="teacher_rate")
    )
    max_retries: int = field(
        default=6,
        metadata=_opt("Retries with exponential backoff (408/409/429/5xx, timeouts).", param="teacher_retries"),
    )
    timeout: float = field(default=120.0, metadata=_opt("Seconds per request."))

    #: fields that change neither the questions nor the answers (a resumed run may change them)
    TRANSIENT = ("url", "api_key_env", "cache", "concurrency", "requests_per_second", "max_retries", "timeout")

    def validate(self) -> None:
        def bad(name: str, why: str, fix: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {why}", where="TeacherAPIConfig", fix=fix)

        if not str(self.url).startswith(("http://", "https://")):
            raise bad("url", "not an http(s) URL", "give the server's base URL, e.g. http://127.0.0.1:8000/v1")
        if not self.model:
            raise bad("model", "empty", "give the served model id (GET /v1/models lists it)")
        if not 0 <= self.top_logprobs <= 20:
            raise bad("top_logprobs", "must be in 0..20 (the OpenAI API's range)", "use e.g. 5 or 20")
        if self.temperature < 0 or self.max_tokens < 1 or self.concurrency < 1 or self.max_retries < 0:
            raise ConfigError(
                "temperature must be >= 0, max_tokens and concurrency >= 1, max_retries >= 0",
                where="TeacherAPIConfig",
                fix="use the defaults (temperature 0, max_tokens 128, concurrency 4, max_retries 6)",
            )
        if self.requests_per_second is not None and self.requests_per_second <= 0:
            raise bad("requests_per_second", "must be positive", "leave it unset (None) for no rate limit")

    def fingerprint(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in self.TRANSIENT}
        d["tokenizer"] = d["tokenizer"] is not None
        return d


#: --teacher-dtype -> the dtype edgelvm.models.load_model loads the teacher in
TEACHER_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class DistillConfig:
    """Options of :func:`edgelvm.distill.distill`. Loss weights multiply terms that are each ~1 at the start."""

    out: str | Path = field(default="student", metadata={"cli": False})
    steps: int = field(default=1000, metadata=_opt("Optimizer steps."))
    batch_size: int = field(default=16, metadata=_opt("Samples per micro-batch and process."))
    grad_accum: int = field(default=1, metadata=_opt("Micro-batches per optimizer step."))
    lr: float = field(default=5e-4, metadata=_opt("Peak learning rate (cosine schedule with warmup)."))
    warmup: int = field(default=50, metadata=_opt("Warmup steps."))
    min_lr_ratio: float = field(default=0.1, metadata=_opt("Final learning rate, a fraction of the peak."))
    weight_decay: float = field(default=0.0, metadata=_opt("AdamW weight decay."))
    grad_clip: float = field(default=1.0, metadata=_opt("Gradient norm clip."))
    divergence: str = field(default="forward_kl", metadata=_opt("forward_kl | reverse_kl | js"))
    temperature: float = field(default=1.0, metadata=_opt("Softmax temperature of the divergence."))
    kd_weight: float = field(
        default=1.0,
        metadata=_opt(
            "Weight of the divergence on response tokens [default: 1; with --teacher-api: 1 when "
            "--teacher-top-logprobs is set, else 0].",
            cli_default=None,
        ),
    )
    ce_weight: float = field(
        default=0.0,
        metadata=_opt(
            "Weight of cross-entropy on the ground truth (the API teacher's text) [default: 0; 1].", cli_default=None
        ),
    )
    visual_kd_weight: float = field(
        default=0.0,
        metadata=_opt("Weight of the divergence at image-token positions (LLaVA-KD; needs the same image layout)."),
    )
    feature_weight: float = field(default=0.0, metadata=_opt("Weight of the image-feature MSE (learned projection)."))
    hidden_weight: float = field(
        default=0.0, metadata=_opt("Weight of the last-hidden-state MSE at response positions (learned projection).")
    )
    top_k: int | None = field(default=None, metadata=_opt("Online KD on the teacher's top-k tokens only."))
    cache_teacher: str | Path | None = field(
        default=None,
        metadata=_opt(
            "Run the teacher once, store its top-k logits here, train from them (the teacher is then freed)."
        ),
    )
    cache_top_k: int = field(default=64, metadata=_opt("Logits kept per token in the cache."))
    cache_shard_size: int = field(default=1024, metadata=_opt("Records per teacher-cache shard."))
    teacher_generate: bool = field(
        default=False, metadata=_opt("Train on the teacher's own greedy answers (sequence-level KD).")
    )
    max_new_tokens: int = field(default=64, metadata=_opt("Answer length with --teacher-generate."))
    val_data: str | Path | None = field(default=None, metadata=_opt("Validation jsonl: teacher-forced exact match."))
    eval_every: int = field(default=0, metadata=_opt("Evaluate every N steps (0: at the end only)."))
    eval_limit: int = field(default=500, metadata=_opt("Validation records used."))
    save_every: int = field(default=200, metadata=_opt("Checkpoint every N steps."))
    log_every: int = field(default=10, metadata=_opt("Log every N steps."))
    seed: int = field(default=0, metadata=_opt("Data order and initialisation seed."))
    resume: bool = field(default=False, metadata=_opt("Continue the unfinished run in --out."))
    stop_after: int | None = field(
        default=None, metadata=_opt("Stop after N steps with a resumable checkpoint (time-boxed jobs).")
    )
    mixed_precision: str = field(
        default="no", metadata=_opt("no | bf16 | fp16 (Accelerate autocast where the device supports it)")
    )
    teacher_dtype: str = field(
        default="fp32",
        metadata=_opt("fp32 | bf16 | fp16: the teacher's weights (half the memory; its outputs go to fp32 for the "
                      "losses). The student trains in fp32."),
    )  # fmt: skip
    progress: bool = field(default=True, metadata={"cli": False})
    #: the teacher is an OpenAI-compatible endpoint: the student trains on its answers (ce_weight) and, where it
    #: returns top_logprobs with the student's tokenizer, on those (kd_weight); the ``teacher`` argument of
    #: distill() is then only what a derived student is derived from (or None with a student checkpoint)
    teacher_api: TeacherAPIConfig | None = field(default=None, metadata={"cli": False})

    def validate(self) -> None:
        def bad(name: str, why: str, fix: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {why}", where="DistillConfig", fix=fix)

        for name in ("steps", "batch_size", "grad_accum", "save_every", "cache_top_k", "cache_shard_size"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be at least 1", f"set {name} to a positive integer")
        if self.lr <= 0:
            raise bad("lr", "must be positive", "a typical value is 1e-4 .. 1e-3")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise bad("teacher_dtype", "unknown", f"use one of {', '.join(TEACHER_DTYPES)}")
        if self.divergence not in DIVERGENCES:
            raise bad("divergence", "unknown", f"use one of {', '.join(DIVERGENCES)}")
        if self.temperature <= 0:
            raise bad("temperature", "must be positive", "use 1.0 (default) or 2.0")
        weights = ("kd_weight", "ce_weight", "visual_kd_weight", "feature_weight", "hidden_weight")
        if any(getattr(self, w) < 0 for w in weights):
            raise bad("kd_weight", "loss weights must be >= 0", "set negative weights to 0")
        if not any(getattr(self, w) > 0 for w in weights):
            raise bad("kd_weight", "every loss weight is 0: nothing to train", "set kd_weight (default 1.0)")
        if self.top_k is not None and self.top_k < 1:
            raise bad("top_k", "must be >= 1", "leave it unset for the full vocabulary")
        if self.cache_teacher is not None and (self.visual_kd_weight > 0 or self.hidden_weight > 0):
            raise bad(
                "cache_teacher",
                "the cache holds response-token logits and image features only",
                "drop visual_kd_weight / hidden_weight, or train online (no cache)",
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise bad("mixed_precision", "unknown", "use no, bf16 or fp16")
        if self.teacher_api is not None:
            self._validate_teacher_api(bad)

    def _validate_teacher_api(self, bad: Any) -> None:
        api = self.teacher_api
        api.validate()
        for name in ("visual_kd_weight", "feature_weight", "hidden_weight"):
            if getattr(self, name) > 0:
                raise bad(name, "an API teacher returns text (and log-probabilities), not logits at image "
                          "positions, image features or hidden states", f"set {name} to 0")  # fmt: skip
        if self.cache_teacher is not None or self.teacher_generate or self.top_k is not None:
            raise bad(
                "teacher_api",
                "cache_teacher / teacher_generate / top_k are for a local teacher",
                "drop them: the API teacher's answers are cached on their own, and its top-k is top_logprobs",
            )
        if self.ce_weight <= 0:
            raise bad(
                "ce_weight",
                "with an API teacher the student learns the teacher's text by cross-entropy (the log-probabilities "
                "cover only the answer's tokens, not where it ends)",
                "set ce_weight (e.g. 1.0)",
            )
        if self.kd_weight > 0 and api.top_logprobs == 0:
            raise bad(
                "kd_weight",
                "token-level KD needs the teacher's log-probabilities, and teacher_api.top_logprobs is 0",
                "set kd_weight=0 (train on the teacher's text), or ask for top_logprobs (1..20) from a server that "
                "returns them",
            )
        if self.kd_weight > 0 and self.divergence != "forward_kl":
            raise bad(
                "divergence",
                "an API's top-k lists vary in length per token (padded with zero-probability entries), which only "
                "forward KL ignores exactly",
                "use divergence=forward_kl with an API teacher",
            )
        if self.kd_weight > 0 and api.tokenizer is None:
            raise bad(
                "kd_weight",
                "token-level KD compares the teacher's tokens with the student's, and the API teacher's tokenizer "
                "is unknown",
                "set teacher_api.tokenizer (--teacher-tokenizer) to its tokenizer (it must equal the student's), "
                "or kd_weight=0",
            )

    def fingerprint(self) -> dict[str, Any]:
        """The options that define a run (a resumed run must match them); progress/paths excluded."""
        d = asdict(self)
        transient = ("out", "resume", "stop_after", "progress", "eval_every", "eval_limit", "save_every", "log_every")
        for k in (*transient, "val_data"):
            d.pop(k)
        d["cache_teacher"] = d["cache_teacher"] is not None
        d["teacher_api"] = self.teacher_api.fingerprint() if self.teacher_api is not None else None
        return d


@dataclass
class DistillReport:
    out: str
    teacher: str
    student_params: int
    teacher_params: int
    steps: int
    samples: int
    wall_seconds: float
    samples_per_second: float
    data: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    finished: bool = True  # False when stop_after ended the invocation early (resume with --resume)
    #: an API teacher's answering: records asked this run / from the cache, malformed (skipped), KD coverage
    teacher_api: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        from edgelvm.manifest import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, default=str))
