"""Check a ``pave`` recipe's parameters before mergekit plans the merge, and say what is wrong first.

mergekit validates a method's parameters while it plans each tensor, deep inside its planner, so a
bad value (``rho: 1.5``, a covariance file that does not exist, ``target: wieght``) ends a
60-line pydantic traceback. :func:`install_recipe_check` wraps ``MergePlanner.__init__``: the
``pave`` parameters of the recipe are validated with the method's own parameter types before any
planning, and a bad one raises :class:`RecipeParameterError` naming the parameter, the model and
the allowed values. In a program that does not catch it (``mergekit-yaml``), that error is printed
as one line, without the traceback; the Python API gets the exception as usual.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterator

log = logging.getLogger("pave_plugins.mergekit")


class RecipeParameterError(ValueError):
    """A ``pave`` parameter of a mergekit recipe has a value the method does not accept."""


def _settings(config) -> Iterator[tuple[str, dict]]:
    """(where, parameters) of every place a recipe can set parameters: global, per model, per slice."""
    yield "parameters", dict(config.parameters or {})
    for m in config.models or []:
        yield f"model {m.model}", dict(m.parameters or {})
    for i, s in enumerate(config.slices or []):
        yield f"slice {i}", dict(getattr(s, "parameters", None) or {})
        for src in getattr(s, "sources", None) or []:
            yield f"slice {i} model {src.model}", dict(src.parameters or {})


def _message(exc) -> str:
    first = exc.errors()[0]
    msg = str(first.get("msg", exc))
    return msg.removeprefix("Value error, ")


def check_recipe(config: Any) -> None:
    """Validate the scalar ``pave`` parameters of a ``MergeConfiguration`` (no-op for other methods)."""
    if getattr(config, "merge_method", None) != "pave":
        return
    from pydantic import ValidationError

    from .pave import PaveMerge

    specs = {p.name: p for p in PaveMerge.spec.parameters}
    for where, params in _settings(config):
        for name, value in params.items():
            spec = specs.get(name)
            if spec is None or isinstance(value, (list, dict)):  # gradients and filters: mergekit resolves them
                continue
            try:
                spec.validate(value)
            except ValidationError as exc:
                msg = _message(exc)
                msg = msg if msg.startswith(name) else f"{name}: {msg}"
                raise RecipeParameterError(f"pave recipe ({where}): {msg}") from None


def _excepthook(previous):
    def hook(exc_type, exc, tb):
        if isinstance(exc, RecipeParameterError):
            log.error("%s", exc)
            return
        previous(exc_type, exc, tb)

    hook._pave_recipe_hook = True  # type: ignore[attr-defined]
    return hook


def install_recipe_check(plan: Any = None) -> bool:
    """Wrap ``mergekit.plan.MergePlanner.__init__`` (idempotent) and the uncaught-error printer."""
    if plan is None:
        import mergekit.plan as plan
    planner = plan.MergePlanner
    if getattr(planner.__init__, "_pave_recipe_check", False):
        return False
    original = planner.__init__

    def __init__(self, config, *args, **kwargs):
        check_recipe(config)
        original(self, config, *args, **kwargs)

    __init__._pave_recipe_check = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    planner.__init__ = __init__
    if not getattr(sys.excepthook, "_pave_recipe_hook", False):
        sys.excepthook = _excepthook(sys.excepthook)
    return True
