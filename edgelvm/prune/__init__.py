"""``edgelvm prune``: structured removal of attention heads (vision and language, GQA-aware) and MLP neurons.

Public surface: :func:`prune`, :class:`PruneConfig`, :class:`PruneReport`.
"""

from edgelvm.prune.config import PruneConfig, PruneReport


def prune(*args, **kwargs):
    """See :func:`edgelvm.prune.api.prune` (imported lazily: it needs torch)."""
    from edgelvm.prune.api import prune as _prune

    return _prune(*args, **kwargs)


__all__ = ["PruneConfig", "PruneReport", "prune"]
