"""Parameter types of this package's mergekit methods: numbers that must be finite (``.nan`` or
``.inf`` in a recipe would merge into NaN weights with exit 0) and never ``true``/``false``."""

from __future__ import annotations

import math
from typing import Annotated, Any, Callable, Literal, Optional

from pydantic import AfterValidator, BeforeValidator


def not_bool(value: Any) -> Any:
    """Refuse ``true``/``false`` before pydantic reads them as 1.0 / 0.0 (a YAML slip, not a number)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    return value


def _finite(value: Optional[float]) -> Optional[float]:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


FiniteFloat = Annotated[float, BeforeValidator(not_bool), AfterValidator(_finite)]
OptionalFiniteFloat = Annotated[Optional[float], BeforeValidator(not_bool), AfterValidator(_finite)]


def _then(check: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        if value is not None and check is not None:
            check(value)
        return value

    return validate


def setting_specs(settings_cls: type) -> tuple:
    """mergekit ``ParameterSpec``s (shared scope) from a settings table
    (:func:`pave_plugins.engine.settings.table`): the declaration lives in the table, mergekit's
    defaults are the table's ``mergekit`` ones; numbers are finite, never ``true``/``false``."""
    from mergekit.merge_methods.base import ParameterScope, ParameterSpec

    from pave_plugins.engine.settings import table

    specs = []
    for row in table(settings_cls):
        if row.type is tuple:  # a list of models: per-model parameters in mergekit (a list there is a gradient)
            continue
        if row.choices is not None:
            kind: Any = Literal[row.choices]  # type: ignore[valid-type]
        elif row.type is bool:
            kind = bool
        else:
            base = Optional[row.type] if row.optional else row.type
            kind = Annotated[base, BeforeValidator(not_bool), AfterValidator(_finite), AfterValidator(_then(row.check))]
        specs.append(ParameterSpec(row.name_for("mergekit"), kind, ParameterScope.SHARED,
                                   default=row.default_for("mergekit")))
    return tuple(specs)
