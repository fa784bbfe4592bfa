"""Parameter types of this package's mergekit methods: numbers that must be finite (``.nan`` or
``.inf`` in a recipe would merge into NaN weights with exit 0) and never ``true``/``false``."""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional

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
