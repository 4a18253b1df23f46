"""``edgelvm prune``: structured removal of attention heads (vision and language, GQA-aware) and MLP neurons.

Public surface: :func:`prune`, :class:`PruneConfig`, :class:`PruneReport`, and the importance callables
(:mod:`edgelvm.prune.importance`: any ``(adapter, batches) -> Scores`` works).
"""

from edgelvm.prune.config import PruneConfig, PruneReport
from edgelvm.prune.importance import (
    ActivationImportance,
    GradientImportance,
    MagnitudeImportance,
    RandomImportance,
    Scores,
    importance_by_name,
)


def prune(*args, **kwargs):
    """See :func:`edgelvm.prune.api.prune` (imported lazily: it needs torch)."""
    from edgelvm.prune.api import prune as _prune

    return _prune(*args, **kwargs)


__all__ = [
    "ActivationImportance",
    "GradientImportance",
    "MagnitudeImportance",
    "PruneConfig",
    "PruneReport",
    "RandomImportance",
    "Scores",
    "importance_by_name",
    "prune",
]
