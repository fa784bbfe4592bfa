"""Which source tensor each model's input to a merge step is.

With ``slices:`` and ``layer_range`` mergekit feeds output layer ``i`` from source layer ``j`` of
each model (``layer_range: [1, 2]``: output layer 0 holds source layer 1). A merge method only sees
the output name; the covariance of an input must be the one its *source* layer saw. mergekit knows
the source names (the ``GatherTensors`` task of the step); a thin wrapper around
``ExecuteMergeMethodTask.execute`` publishes them for the duration of the step (a context variable:
each worker thread sees its own step), and :func:`source_name` reads them.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any, Hashable, Mapping

logger = logging.getLogger("pave_plugins.mergekit")

_CURRENT: ContextVar[Mapping[Hashable, str]] = ContextVar("pave_source_names", default={})


def source_name(model: Hashable, output_name: str) -> str:
    """The tensor of ``model`` that feeds the step merging ``output_name`` (itself outside a step)."""
    return _CURRENT.get().get(model, output_name)


def step_source_names(gather: Any) -> dict[Hashable, str]:
    """``{model: source tensor name}`` of a step's input task (``GatherTensors`` or a wrapper of one)."""
    inner = getattr(gather, "gather_tensors", None)
    if inner is not None and inner is not gather:
        return step_source_names(inner)
    info = getattr(gather, "weight_info", None)  # mergekit's ImmutableMap is no Mapping: duck-typed
    if callable(getattr(info, "items", None)):
        return {model: wi.name for model, wi in info.items()}
    tensors = getattr(gather, "tensors", None)  # TensorDictWrapper: {model: LoadTensor}
    if callable(getattr(tensors, "items", None)):
        return {m: t.tensor for m, t in tensors.items() if isinstance(getattr(t, "tensor", None), str)}
    return {}


def install_source_names(task_adapter: Any = None) -> bool:
    """Wrap ``ExecuteMergeMethodTask.execute`` (idempotent); False when mergekit's task changed."""
    if task_adapter is None:
        import mergekit.merge_methods.task_adapter as task_adapter
    cls = getattr(task_adapter, "ExecuteMergeMethodTask", None)
    if cls is None or "gather_tensors" not in getattr(cls, "model_fields", {}):
        logger.warning("pave: mergekit's merge step changed: covariances are looked up by the output tensor name")
        return False
    if getattr(cls.execute, "_pave_source_names", False):
        return True
    original = cls.execute

    def execute(self, *args, **kwargs):
        token = _CURRENT.set(step_source_names(self.gather_tensors))
        try:
            return original(self, *args, **kwargs)
        finally:
            _CURRENT.reset(token)

    execute._pave_source_names = True  # type: ignore[attr-defined]
    execute.__wrapped__ = original  # type: ignore[attr-defined]
    cls.execute = execute
    return True
