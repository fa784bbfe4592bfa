"""Where PAVE's covariances come from: one protocol, one cache of prepared covariances.

A *covariance source* holds the input covariances ``C`` of one fine-tuned model (PAVE eq. 5), one
per distinct layer input; layers that read the same input (q/k/v, gate/up) map to one key. Two
implement it: :class:`pave_plugins.io.covariance.CovarianceFile` (a file of ``pave collect``, read
lazily) and :class:`pave_plugins.collect.CovarianceSet` (collected in memory). Every face (mergekit,
FusionBench, ``pave purify``, the benchmark) reads covariances only through this protocol.

:class:`PreparedCache` keeps the *prepared* covariances (validated, damped until a Cholesky
factorisation succeeds: :func:`pave_plugins.core.prepare_covariance`), a few per source, so that the
layers sharing an input prepare it once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from pave_plugins.core.purify import Damping, PreparedCovariance, prepare_covariance

from .covariance import CovarianceFileError

logger = logging.getLogger("pave_plugins")

#: prepared covariances kept per source (a layer's tensors come one after the other)
PREPARED_PER_SOURCE = 2
#: what a covariance collected on other weights of the same shapes is: refused, a warning, ignored
FINGERPRINT_POLICIES = ("error", "warn", "ignore")


@runtime_checkable
class CovarianceSource(Protocol):
    """The covariances of one model, looked up by layer or weight name (a model prefix may differ)."""

    @property
    def origin(self) -> str:
        """Where they come from, for messages (a file path, or how they were collected)."""

    @property
    def layers(self) -> list[str]:
        """Layer (module) names that have a covariance."""

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the weights they were collected on (``""`` if unknown)."""

    @property
    def layer_info(self) -> dict:
        """``{layer: {"weight_layout": "out_in" | "in_out", ...}}`` where known."""

    def resolve(self, name: str) -> str | None:
        """The source's layer name for a layer or weight name, or ``None``."""

    def key_for(self, name: str) -> str:
        """Key of the covariance of a layer (layers reading the same input share it)."""

    def key_sizes(self) -> dict[str, int]:
        """``{key: n}`` for each ``n x n`` covariance (read without loading the matrices)."""

    def get(self, name: str, *, device: torch.device | str | None = None) -> Tensor:
        """The covariance ``C`` (``in x in``) of a layer."""


def lookup_key(source: CovarianceSource | None, layer: str) -> str | None:
    """Key of ``layer``'s covariance in ``source``, or ``None`` when it has none (or no source)."""
    if source is None or source.resolve(layer) is None:
        return None
    return source.key_for(layer)


def weight_layout(source: CovarianceSource, layer: str) -> str | None:
    """``"in_out"`` (GPT-2 Conv1D, ``y = x W``) or ``"out_in"`` (``nn.Linear``) as ``source`` records
    it for ``layer``, or ``None`` when it does not say."""
    return source.layer_info.get(source.resolve(layer) or "", {}).get("weight_layout")


def token_count(source: CovarianceSource, key: str) -> int | None:
    """Tokens accumulated in covariance ``key`` of ``source`` (``None`` when it does not say)."""
    counts = getattr(source, "counts", None)
    value = counts.get(key) if isinstance(counts, dict) else None
    return int(value) if value is not None else None


def tokens_of(source: CovarianceSource, key: str) -> int | None:
    """The ``N`` of covariance ``key``: its own token count, else the file's (``None``: not recorded)."""
    count = token_count(source, key)
    if count is None:
        metadata = getattr(source, "metadata", None)
        count = getattr(metadata, "n_tokens", None) or None
    return count


class PreparedCache:
    """Bounded cache of prepared covariances: at most ``per_source`` per source, least recent out.

    Thread-safe (mergekit ``--multi-gpu`` runs tensors in worker threads): a covariance is prepared
    once even when several threads ask for it, and threads preparing different covariances do not
    wait for each other (the factorisation runs outside the cache's lock).
    """

    def __init__(self, per_source: int = PREPARED_PER_SOURCE) -> None:
        self.per_source = per_source
        self.n_prepared = 0  # how many Cholesky checks were run (tests and logs)
        self._lock = threading.RLock()
        self._entries: dict[int, tuple[CovarianceSource, OrderedDict]] = {}  # the source is kept alive
        self._preparing: dict[tuple, threading.Lock] = {}  # one lock per covariance being prepared

    def get(
        self,
        source: CovarianceSource,
        layer: str,
        *,
        device: torch.device | str,
        compute_dtype: torch.dtype,
        keep_factor: bool = False,
        damping: Damping = Damping(),
    ) -> tuple[PreparedCovariance, str]:
        """The prepared covariance of ``layer`` and its key (with its Cholesky factor if
        ``keep_factor``; ``damping`` added, see :class:`~pave_plugins.core.purify.Damping`); damping
        a singular covariance needed is logged (warning) with the amount."""
        key = source.key_for(layer)
        ck = (key, str(device), str(compute_dtype), keep_factor, damping)
        with self._lock:
            hit = self._lookup(source, ck)
            if hit is not None:
                return hit, key
            preparing = self._preparing.setdefault((id(source), ck), threading.Lock())
        with preparing:  # the first thread prepares it; the others wait here, then find it cached
            with self._lock:
                hit = self._lookup(source, ck)
            if hit is not None:
                return hit, key
            try:
                prepared = self._prepare(source, layer, key, device=device, compute_dtype=compute_dtype,
                                         keep_factor=keep_factor, damping=damping)
                with self._lock:
                    cache = self._entries.setdefault(id(source), (source, OrderedDict()))[1]
                    cache[ck] = prepared
                    while len(cache) > self.per_source:
                        cache.popitem(last=False)
            finally:
                with self._lock:
                    self._preparing.pop((id(source), ck), None)
        return prepared, key

    def _lookup(self, source: CovarianceSource, ck: tuple) -> PreparedCovariance | None:
        cache = self._entries.setdefault(id(source), (source, OrderedDict()))[1]
        hit = cache.get(ck)
        if hit is not None:
            cache.move_to_end(ck)
        return hit

    def _prepare(self, source: CovarianceSource, layer: str, key: str, **kw) -> PreparedCovariance:
        try:
            n_tokens = tokens_of(source, key) if kw["damping"].rule == "authors" else None
            prepared = prepare_covariance(
                source.get(layer, device=kw.pop("device")),
                name=f"covariance {key!r} (layer {layer!r}) in {source.origin}",
                n_tokens=n_tokens,
                **kw,
            )
        except ValueError as exc:
            raise CovarianceFileError(str(exc)) from exc
        with self._lock:
            self.n_prepared += 1
        if prepared.singular:  # expected where a task's inputs span fewer directions than the layer has:
            # INFO here, one warning at the end of the run (the rank report's), every damping in the report
            logger.info("covariance %r (layer %r) in %s is singular: damped with %.3g (%.3g x mean diag C)",
                        key, layer, source.origin, prepared.damping, prepared.relative_damping)
        return prepared

    def release(self, source: CovarianceSource) -> None:
        """Forget the prepared covariances of ``source`` (the next layer reads another input)."""
        with self._lock:
            self._entries.pop(id(source), None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
