"""``DistillConfig`` and ``DistillReport``: the distill stage's options and its result."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelvm.distill.losses import DIVERGENCES
from edgelvm.errors import ConfigError


@dataclass
class TeacherAPIConfig:
    """A teacher reached only through an OpenAI-compatible chat-completions endpoint (``edgelvm serve``, vLLM,
    llama.cpp's server, a hosted model). It answers every training record once (cached on disk, resumable); the
    student then trains on its text (``ce_weight``) and, where the server returns ``top_logprobs`` and the teacher's
    tokenizer equals the student's, on its top-k log-probabilities (``kd_weight``).

    The API key is read from the environment variable ``api_key_env`` (never stored, never a flag)."""

    url: str  # base URL, e.g. http://127.0.0.1:8000/v1
    model: str  # the served model id
    api_key_env: str = "EDGELVM_TEACHER_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 128
    top_logprobs: int = 0  # ask for this many alternatives per token (0: no logprobs; OpenAI allows up to 20)
    tokenizer: str | None = None  # the teacher's tokenizer (directory or hub id): needed for token-level KD
    cache: str | Path | None = None  # answers on disk (default OUT/.distill/teacher_api)
    concurrency: int = 4  # requests in flight
    requests_per_second: float | None = 10.0  # rate limit (None: none)
    max_retries: int = 6  # the openai client's own retries: exponential backoff on 408/409/429/5xx/timeouts
    timeout: float = 120.0  # seconds per request

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


@dataclass
class DistillConfig:
    """Options of :func:`edgelvm.distill.distill`. Loss weights multiply terms that are each ~1 at the start."""

    out: str | Path = "student"
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | js
    temperature: float = 1.0
    kd_weight: float = 1.0  # divergence on response-token logits
    ce_weight: float = 0.0  # cross-entropy on the ground truth (or the teacher's generated response)
    visual_kd_weight: float = 0.0  # divergence on image-token positions (LLaVA-KD); needs the same image layout
    feature_weight: float = 0.0  # MSE on the projector's image features, through a learned projection
    hidden_weight: float = 0.0  # MSE on the last hidden state at response positions, through a learned projection
    top_k: int | None = None  # online KD on the teacher's top-k only (None: full vocabulary)
    cache_teacher: str | Path | None = None  # build/use an offline top-k cache here; the teacher is then freed
    cache_top_k: int = 64
    cache_shard_size: int = 1024
    teacher_generate: bool = False  # responses = the teacher's greedy answers (sequence-level KD)
    max_new_tokens: int = 64
    val_data: str | Path | None = None
    eval_every: int = 0  # 0: only at the end (when val_data is given)
    eval_limit: int = 500
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # stop this invocation after N steps with a resumable checkpoint (time-boxed jobs)
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate autocast where the device supports it)
    progress: bool = True
    #: the teacher is an OpenAI-compatible endpoint: the student trains on its answers (ce_weight) and, where it
    #: returns top_logprobs with the student's tokenizer, on those (kd_weight); the ``teacher`` argument of
    #: distill() is then only what a derived student is derived from (or None with a student checkpoint)
    teacher_api: TeacherAPIConfig | None = None

    def validate(self) -> None:
        def bad(name: str, why: str, fix: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {why}", where="DistillConfig", fix=fix)

        for name in ("steps", "batch_size", "grad_accum", "save_every", "cache_top_k", "cache_shard_size"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be at least 1", f"set {name} to a positive integer")
        if self.lr <= 0:
            raise bad("lr", "must be positive", "a typical value is 1e-4 .. 1e-3")
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
