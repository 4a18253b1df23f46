"""``edgelvm distill``: a teacher VLM teaches a smaller student (logit KD, feature matching, offline teacher cache).

Public surface: :func:`distill`, :class:`DistillConfig` (with :class:`TeacherAPIConfig` for a teacher behind an
OpenAI-compatible API), :class:`DistillReport`, :class:`StudentSpec`.
"""

from edgelvm.distill.config import DistillConfig, DistillReport, TeacherAPIConfig
from edgelvm.distill.student import StudentSpec


def distill(*args, **kwargs):
    """See :func:`edgelvm.distill.trainer.distill` (imported lazily: it needs torch)."""
    from edgelvm.distill.trainer import distill as _distill

    return _distill(*args, **kwargs)


__all__ = ["DistillConfig", "DistillReport", "StudentSpec", "TeacherAPIConfig", "distill"]
