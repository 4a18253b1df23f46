"""Evaluation: task accuracy per question type, hallucination rate, agreement with a teacher."""

from edgelvm.eval.evaluate import EvalConfig, EvalReport, evaluate

__all__ = ["EvalConfig", "EvalReport", "evaluate"]
