"""mergekit ``slices:`` with ``layer_range``: each output layer is purified with the covariance of the
source layer it comes from (mergekit feeds output layer 0 from source layer 1 with
``layer_range: [1, 2]``), checked against PAVE written out from the paper (eq. 5-6, Algorithm 1 in
float64, :mod:`independent_reference`) on the source layer's weights and covariances."""

from __future__ import annotations

import pytest
import torch
from independent_reference import purified_weights
from mergekit_helpers import load_tensors
from outputs_helpers import merge

from pave_plugins.io.covariance import CovarianceFile

RHO = 0.75
LAYER = "self_attn.q_proj.weight"


def _recipe(family, layer_range):
    sources = [{"model": str(family["base"]), "layer_range": layer_range}]
    for ft, c in zip(family["fts"], family["covs"]):
        sources.append({"model": str(ft), "layer_range": layer_range,
                        "parameters": {"covariance": str(c), "weight": 1.0}})
    return {"merge_method": "pave", "base_model": str(family["base"]), "slices": [{"sources": sources}],
            "parameters": {"inner": "task_arithmetic", "rho": RHO, "lambda": 1.0}, "dtype": "float32"}


def _expected(family, source_layer: int) -> torch.Tensor:
    """Task arithmetic of the PAVE-purified fine-tunes of ``source_layer``, from the paper."""
    return _expected_with(family, weights_layer=source_layer, covariance_layer=source_layer)


@pytest.mark.parametrize("source_layer", [0, 1])
def test_a_slice_is_purified_with_its_source_layers_covariance(fam, tmp_path, source_layer):  # noqa: F811
    out = tmp_path / "merged"
    merge(_recipe(fam, [source_layer, source_layer + 1]), out)
    got = load_tensors(out)[f"model.layers.0.{LAYER}"].double()
    want = _expected(fam, source_layer)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), float((got - want).abs().max())
    if source_layer == 1:  # what layer 0's covariances would have given is something else
        assert not torch.allclose(got, _expected_with(fam, weights_layer=1, covariance_layer=0), rtol=1e-4, atol=1e-5)


def _expected_with(family, *, weights_layer: int, covariance_layer: int) -> torch.Tensor:
    name = f"model.layers.{weights_layer}.{LAYER}"
    base = load_tensors(family["base"])[name]
    fts = [load_tensors(d)[name] for d in family["fts"]]
    covs = [CovarianceFile(c).get(f"model.layers.{covariance_layer}.{LAYER}").double() for c in family["covs"]]
    purified = purified_weights(base, fts, covs, RHO)
    return base.double() + sum(p - base.double() for p in purified)
