"""The model card of a ``pave``, ``tsv`` or ``regmean`` merge, ready to publish.

``mergekit-yaml`` writes ``README.md`` itself from ``mergekit.card.generate_card``; for this package's
methods a thin wrapper of ``mergekit.merge.generate_card`` (installed when a merge is planned, once
``mergekit.merge`` is fully imported) returns a card in mergekit's layout whose metadata names the Hub models only (never a local
path), ``library_name: transformers`` and the tags ``merge``, ``mergekit`` and the method's; the papers
are links and the recipe names folders, not the paths of this machine. Stock methods keep
mergekit's card. The same package keeps mergekit's own ``torch_dtype`` deprecation warning (its ``_model_out_config``
sets the old attribute) out of these merges' logs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

from pave_plugins import cards, papers

logger = logging.getLogger("pave_plugins.mergekit")

PAPERS = {"pave": papers.PAVE, "tsv": papers.TSV, "regmean": papers.REGMEAN}
MERGEKIT = "[mergekit](https://github.com/arcee-ai/mergekit)"


def _inner(config: Any) -> str | None:
    value = (config.parameters or {}).get("inner") if config.merge_method == "pave" else None
    return value if isinstance(value, str) else ("task_arithmetic" if config.merge_method == "pave" else None)


def _paths(ref: Any) -> list[str]:
    """The model path and the LoRA path of a ``ModelReference``."""
    return [p.path for p in (ref.model, getattr(ref, "lora", None)) if p is not None]


def _ref_md(ref: Any) -> str:
    def one(path: str) -> str:
        hub = cards.hub_id(path)
        return f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{cards.folder_name(path)}`"

    return " + ".join(one(p) for p in _paths(ref))


def tags(config: Any) -> list[str]:
    """``merge``, ``mergekit``, the method's tag and the inner method's (``pave``: ``inner: ties`` -> ``ties``)."""
    method, inner = config.merge_method, _inner(config)
    inner_tag = cards.METHOD_TAGS.get(inner, inner.replace("_", "-")) if inner else None
    return ["merge", "mergekit", *cards.method_tags(method), *([inner_tag] if inner_tag else [])]


def publishable_card(config: Any, config_yaml: str, name: str | None = None) -> str:
    """The card of a merge by one of this package's methods (see the module docstring); any other
    method's merge gets the same layout without papers (the demo publishes its stock merge so)."""
    from mergekit.card import method_md

    method, inner, base = config.merge_method, _inner(config), config.base_model
    models = sorted(config.referenced_models(), key=str)
    bases = cards.hub_ids(p.model.path for p in ([base] if base else []) + models)
    cited = list(dict.fromkeys(PAPERS[m] for m in (method, inner) if m in PAPERS))
    ours = f" with the `{method}` method of pave_plugins" if method in PAPERS else ""
    local = [p for ref in models for p in _paths(ref)]
    lines = [
        cards.metadata(bases, tags(config)) + f"# {name or 'merged model'}", "",
        f"This is a merge of pre-trained language models created using {MERGEKIT}{ours}.", "",
        "## Merge Details", "### Merge Method", "",
        f"This model was merged using the {method_md(method)} merge method"
        + (f" around mergekit's `{inner}`" if inner else "")
        + (f" using {_ref_md(base)} as a base" if base else "") + ".", "",
        "### Models Merged", "", "The following models were included in the merge:",
        *[f"* {_ref_md(m)}" for m in models if m != base], "",
        *(["### Papers", "", *[cards.paper_line(p) for p in cited], ""] if cited else []),
        "### Configuration", "", "The following YAML configuration was used to produce this model:", "",
        *cards.recipe_block(config_yaml, local),
    ]
    return "\n".join(lines)


class _MergekitTorchDtype(logging.Filter):
    """Drops transformers' ``torch_dtype`` deprecation warning when mergekit's own ``_model_out_config``
    raises it for a merge by one of ``methods`` (None: any; it sets the old attribute, nothing a user
    can change)."""

    def __init__(self, methods: tuple[str, ...] | None):
        super().__init__()
        self.methods = methods

    def filter(self, record: logging.LogRecord) -> bool:
        if "`torch_dtype` is deprecated" not in record.getMessage():
            return True
        frame = sys._getframe()
        while frame is not None:
            if frame.f_code.co_name == "_model_out_config" and "mergekit" in frame.f_code.co_filename:
                method = getattr(frame.f_locals.get("config"), "merge_method", None)
                return self.methods is not None and method not in self.methods
            frame = frame.f_back
        return True


@contextlib.contextmanager
def quiet_torch_dtype():
    """mergekit's ``torch_dtype`` warning dropped for merges by any method while the block runs (the demo)."""
    log = logging.getLogger("transformers.configuration_utils")
    flt = _MergekitTorchDtype(None)
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


def install_torch_dtype_filter(methods: tuple[str, ...]) -> None:
    """Attach :class:`_MergekitTorchDtype` to transformers' configuration logger (idempotent)."""
    log = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _MergekitTorchDtype) for f in log.filters):
        log.addFilter(_MergekitTorchDtype(methods))


def install_card_hook(merge: Any, methods: tuple[str, ...]) -> bool:
    """Wrap ``mergekit.merge.generate_card`` so that merges by ``methods`` get :func:`publishable_card`
    (idempotent; called when a merge is planned, once ``mergekit.merge`` is fully imported)."""
    if getattr(merge, "_pave_card_hook", False):
        return True
    original = getattr(merge, "generate_card", None)
    if original is None:
        logger.warning("pave: mergekit's model card writer changed; cards of pave merges are mergekit's")
        return False

    def generate_card(config, config_yaml, name=None, **kwargs):
        if config.merge_method not in methods:
            return original(config, config_yaml, name, **kwargs)
        return publishable_card(config, config_yaml, name)

    generate_card.__wrapped__ = original  # type: ignore[attr-defined]
    merge.generate_card = generate_card
    merge._pave_card_hook = True
    return True
