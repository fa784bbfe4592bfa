"""Recipe checks for the ``pave`` and ``tsv`` methods, run when mergekit plans a merge (before any
tensor is read or written): a covariance given where it cannot be meant is an error that says where
it belongs; a parameter name the method does not know is a warning naming the nearest valid one; a
value the method does not accept (``rho: 1.5``, a covariance file that does not exist, ``target:
wieght``) is an error naming the parameter and the allowed values, checked with the method's own
parameter types before mergekit's planner would fail on it deep in a pydantic traceback.

The errors are :class:`RecipeParameterError`; in a program that does not catch them
(``mergekit-yaml``) they are printed as one line, without the traceback. The Python API gets the
exception as usual.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from typing import Any, Iterator

logger = logging.getLogger("pave_plugins.mergekit")

WHERE = "put each model's own file under that model: `models: [{model: M, parameters: {covariance: FILE}}]`"


class RecipeParameterError(ValueError):
    """A ``pave`` or ``tsv`` parameter of a mergekit recipe has a value or place the method does not accept."""


#: the mergekit methods of this package: their recipes are checked at planning
OUR_METHODS = ("pave", "tsv", "regmean")


def check_recipe(config: Any, method: Any = None) -> None:
    """Check a ``MergeConfiguration`` of a ``pave``, ``tsv`` or ``regmean`` merge (other methods: nothing)."""
    if config.merge_method not in OUR_METHODS:
        return
    for where, model, params in _parameter_blocks(config):
        try:
            if config.merge_method == "pave":
                _check_covariance(where, model, params)
        except RecipeParameterError:
            raise
        except ValueError as exc:
            raise RecipeParameterError(str(exc)) from None
        if method is not None:
            _warn_unknown(config.merge_method, method, where, params)
            _check_values(config.merge_method, method, where, params)
    if config.merge_method == "pave":
        _check_settings(config)


def check_output_apart(config: Any, out_path: Any) -> None:
    """The merge's output folder is not, does not contain and is not inside a model folder or a
    covariance file of the recipe (mergekit would write its shards there)."""
    from pave_plugins.io.output import check_apart

    def local(model: Any) -> str | None:  # a ModelReference's folder, when it is one on this disk
        path = getattr(getattr(model, "model", None), "path", None)
        return path if isinstance(path, str) and os.path.exists(os.path.expanduser(path)) else None

    models, covs = [], []
    for _, model, params in _parameter_blocks(config):
        if model is not None:
            models.append(local(model))
        if isinstance(params.get("covariance"), str):
            covs.append(os.path.expanduser(params["covariance"]))
    models.append(local(getattr(config, "base_model", None)))
    try:
        check_apart(out_path, {"model": models, "covariance": covs}, out_flag="output folder")
    except OSError as exc:
        raise RecipeParameterError(f"{config.merge_method} recipe: {exc}") from None


def _check_settings(config: Any) -> None:
    """The settings' cross-checks (``gamma`` against ``rho``, the authors' damping rule needs a
    ``damping``) on each global parameter block, by the one declaration (``PaveSettings``); each
    value alone passed its own check."""
    from pave_plugins.engine.settings import PaveSettings, table

    for where, model, params in _parameter_blocks(config):
        if model is not None or not params:
            continue
        merged = {**(config.parameters or {}), **params}
        values = {row.name: merged[row.name_for("mergekit")] for row in table(PaveSettings)
                  if row.type is not tuple and isinstance(merged.get(row.name_for("mergekit")), (int, float, str))}
        try:
            PaveSettings(**values)
        except ValueError as exc:
            raise RecipeParameterError(f"pave recipe ({where}): {exc}") from None


def _check_values(name: str, method: Any, where: str, params: dict) -> None:
    """Each scalar value against the method's parameter type (gradients and filters: mergekit resolves them)."""
    from pydantic import ValidationError

    specs = {p.name: p for p in method.spec.parameters}
    for key, value in params.items():
        spec = specs.get(key)
        if spec is None or isinstance(value, (list, dict)):
            continue
        try:
            spec.validate(value)
        except ValidationError as exc:
            msg = str(exc.errors()[0].get("msg", exc)).removeprefix("Value error, ")
            msg = msg if msg.startswith(key) else f"{key}: {msg}"
            raise RecipeParameterError(f"{name} recipe ({where}): {msg}") from None


def _parameter_blocks(config: Any) -> Iterator[tuple[str, Any, dict]]:
    """``(where, model or None, parameters)`` for every parameter block of the recipe."""
    yield "the recipe's global `parameters`", None, config.parameters or {}
    modules = [("", config)] + [(f"module {n!r}: ", m) for n, m in (config.modules or {}).items()]
    for prefix, mod in modules:
        if mod is not config:
            yield f"{prefix}`parameters`", None, mod.parameters or {}
        for m in mod.models or []:
            yield f"{prefix}model {m.model}", m.model, m.parameters or {}
        for i, sl in enumerate(mod.slices or []):
            yield f"{prefix}slice {i} `parameters`", None, sl.parameters or {}
            for src in sl.sources:
                yield f"{prefix}slice {i} model {src.model}", src.model, src.parameters or {}


def _check_covariance(where: str, model: Any, params: dict) -> None:
    if "covariance" not in params:
        return
    value = params["covariance"]
    if model is None:
        raise ValueError(f"pave: `covariance:` under {where} would give every model the same covariance "
                         f"(one task's statistics for all); {WHERE}")
    if not isinstance(value, str):
        raise ValueError(f"pave: {where}: covariance must be one file path, got {type(value).__name__} {value!r}; "
                         f"{WHERE}")
    if os.path.isdir(os.path.expanduser(value)):
        raise ValueError(f"pave: {where}: covariance {value} is a folder; give this model's covariance file "
                         "(the .safetensors file `pave collect` wrote for it)")


def _warn_unknown(name: str, method: Any, where: str, params: dict) -> None:
    known = sorted(p.name for p in method.spec.parameters)
    for key in params:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f" (known: {', '.join(known)})"
            logger.warning("%s: unknown parameter %r under %s, ignored%s", name, key, where, hint)


def install_recipe_check(plan: Any) -> bool:
    """Wrap ``mergekit.plan.MergePlanner.__init__`` so that :func:`check_recipe` runs first (idempotent)."""
    planner = getattr(plan, "MergePlanner", None)
    if planner is None or getattr(planner, "_pave_recipe_check", False):
        return planner is not None
    original = planner.__init__

    def __init__(self, config, *args, **kwargs):
        from mergekit.merge_methods import registry

        method = registry.get(config.merge_method) if config.merge_method in OUR_METHODS else None
        check_recipe(config, method)
        if method is not None:
            check_lora_cache(config, kwargs.get("options", args[1] if len(args) > 1 else None))
        _install_card_hook()
        original(self, config, *args, **kwargs)

    original_plan = planner.plan_to_disk

    def plan_to_disk(self, out_path, *args, **kwargs):
        if self.config.merge_method in OUR_METHODS:
            check_output_apart(self.config, out_path)
        return original_plan(self, out_path, *args, **kwargs)

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    plan_to_disk.__wrapped__ = original_plan  # type: ignore[attr-defined]
    planner.__init__ = __init__
    planner.plan_to_disk = plan_to_disk
    planner._pave_recipe_check = True
    if not getattr(sys.excepthook, "_pave_recipe_hook", False):
        sys.excepthook = _excepthook(sys.excepthook)
    return True


def lora_cache_message(ref: Any) -> str:
    return (f"model {ref} is a LoRA adapter on a model (`model: base+lora`): mergekit merges the adapter into "
            "its model first and needs a folder for that: pass --lora-merge-cache DIR to mergekit-yaml "
            "(MergeOptions(lora_merge_cache=DIR) from Python)")


def check_lora_cache(config: Any, options: Any) -> None:
    """A recipe of ours with a ``base+lora`` model and no LoRA merge cache: the one-line error naming the flag."""
    if options is None or getattr(options, "lora_merge_cache", None):
        return
    for ref in config.referenced_models():
        if getattr(ref, "lora", None) is not None:
            raise RecipeParameterError(f"{config.merge_method} recipe: {lora_cache_message(ref)}")


def install_lora_cache_check(tasks: Any) -> bool:
    """Wrap ``mergekit.io.tasks.LoaderCache.get`` (idempotent): a ``base+lora`` model without
    ``--lora-merge-cache`` fails with :func:`lora_cache_message` (one line) instead of mergekit's
    traceback "Need to specify cache dir to merge adapters" (mergekit loads the models before it
    plans, so the planning check comes too late on the command line)."""
    cache = getattr(tasks, "LoaderCache", None)
    if cache is None or getattr(cache.get, "_pave_lora_check", False):
        return cache is not None
    original = cache.get

    def get(self, model):
        if getattr(model, "lora", None) is not None and not getattr(self, "lora_cache_dir", None) \
                and model not in getattr(self, "loaders", {}):
            raise RecipeParameterError(lora_cache_message(model))
        return original(self, model)

    get._pave_lora_check = True  # type: ignore[attr-defined]
    get.__wrapped__ = original  # type: ignore[attr-defined]
    cache.get = get
    return True


def _install_card_hook() -> None:
    """Our methods' model cards (:mod:`.card`), once ``mergekit.merge`` is fully imported (it is not
    yet when the plugins load: mergekit.merge imports the merge methods)."""
    merge = sys.modules.get("mergekit.merge")
    if merge is not None and not getattr(getattr(merge, "__spec__", None), "_initializing", False):
        from .card import install_card_hook

        install_card_hook(merge, OUR_METHODS)


def anticipated(exc: BaseException) -> bool:
    """A bad recipe value, or an error this package raised about an input (:mod:`pave_plugins.errors`)."""
    from pave_plugins.errors import anticipated as raised_on_input

    return isinstance(exc, RecipeParameterError) or raised_on_input(exc)


def _excepthook(previous):
    """Print an anticipated error of a mergekit run (:func:`anticipated`) as one line naming what is
    at fault, unless ``PAVE_DEBUG=1``; everything else as before."""

    def hook(exc_type, exc, tb):
        from pave_plugins.errors import debugging, first_line

        if anticipated(exc) and not debugging():
            logger.error("%s", first_line(exc))
            return
        previous(exc_type, exc, tb)

    hook._pave_recipe_hook = True  # type: ignore[attr-defined]
    return hook
