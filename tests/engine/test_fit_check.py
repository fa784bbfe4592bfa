"""One fit check for every face: a covariance file whose matrices do not fit the model's layers is
refused with the same message by mergekit-yaml, fusion_bench (``pave/pave``), ``pave purify`` and the
benchmark harness."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fusion_bench_helpers as fh
import mergekit_helpers as mh
from pave_plugins.io.covariance import CovarianceFile, CovarianceFileError, CovarianceMetadata, save_covariances

# the one message, whatever the face: file, layer, both sizes, and the model it was checked against
MESSAGE = (r"{file}: covariance of layer '{layer}' is {n} x {n} but the model's '{layer}' takes {d} input "
           r"features: this file was collected on another model \(model {model}\)")


def _too_wide(layer_map: dict[str, str], sizes: dict[str, int], path: Path) -> Path:
    """A covariance file with the model's layer names whose matrices are one row/column too wide."""
    covs = {k: torch.eye(n + 1, dtype=torch.float64) for k, n in sizes.items()}
    save_covariances(path, covs, CovarianceMetadata(layer_map=layer_map))
    return path


def _expect(path: Path, layer: str, n: int, d: int, model: str) -> str:
    return MESSAGE.format(file=re.escape(str(path)), layer=re.escape(layer), n=n, d=d, model=re.escape(model))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    base, fts = mh.build_family("llama", root, n_models=2)
    good = mh.write_covariances(fts[0], root / "good.safetensors", seed=1)
    ref = CovarianceFile(mh.write_covariances(fts[1], root / "ref.safetensors", seed=2))
    bad = _too_wide(ref.metadata.layer_map, ref.key_sizes(), root / "bad.safetensors")
    first = sorted(ref.metadata.layer_map)[0]  # the fit check reports the first layer in name order
    d = ref.key_sizes()[ref.metadata.layer_map[first]]
    return {"base": base, "fts": fts, "good": good, "bad": bad, "layer": first, "d": d}


def test_pave_purify_refuses(llama, tmp_path):
    from pave_plugins.cli.purify import purify_checkpoints

    with pytest.raises(CovarianceFileError) as err:
        purify_checkpoints(llama["base"], llama["fts"], [llama["good"], llama["bad"]], tmp_path / "out")
    assert re.search(_expect(llama["bad"], llama["layer"], llama["d"] + 1, llama["d"], str(llama["fts"][1])),
                     str(err.value)), str(err.value)
    assert not (tmp_path / "out").exists()


def test_mergekit_yaml_refuses(llama, tmp_path):
    recipe = (f"merge_method: pave\nbase_model: {llama['base']}\nmodels:\n"
              f"  - model: {llama['fts'][0]}\n    parameters: {{weight: 1.0, covariance: {llama['good']}}}\n"
              f"  - model: {llama['fts'][1]}\n    parameters: {{weight: 1.0, covariance: {llama['bad']}}}\n"
              "dtype: float32\n")
    proc = mh.run_mergekit_yaml(recipe, tmp_path / "merged")
    assert proc.returncode != 0
    assert re.search(_expect(llama["bad"], llama["layer"], llama["d"] + 1, llama["d"], str(llama["fts"][1])),
                     proc.stderr), proc.stderr[-2000:]


def test_fusion_bench_refuses(tmp_path):
    from fusion_bench import BaseModelPool

    from pave_plugins.fusion_bench.pave import PAVEAlgorithm

    base, fts = fh.tiny_models(2)
    files = {k: fh.save_covariance_file(tmp_path / f"{k}.safetensors", fh.covariances_of(m, fh.inputs_for(k)))
             for k, m in fts.items()}
    ref = CovarianceFile(files["task1"])
    bad = _too_wide(ref.metadata.layer_map, ref.key_sizes(), tmp_path / "bad.safetensors")
    with pytest.raises(CovarianceFileError) as err:
        PAVEAlgorithm(covariances={**files, "task1": str(bad)}).run(BaseModelPool(fh.pool_dict(base, fts)))
    assert re.search(_expect(bad, "fc1", fh.IN + 1, fh.IN, "task1"), str(err.value)), str(err.value)


def test_benchmark_refuses(tmp_path):
    from pave_plugins.bench.methods import pave_purify_pool
    from pave_plugins.engine.step import CoSVDStore

    base, fts = fh.tiny_models(2)
    sds = [m.state_dict() for m in fts.values()]
    files = [fh.save_covariance_file(tmp_path / f"{k}.safetensors", fh.covariances_of(m, fh.inputs_for(k)))
             for k, m in fts.items()]
    ref = CovarianceFile(files[1])
    bad = _too_wide(ref.metadata.layer_map, ref.key_sizes(), tmp_path / "bad.safetensors")
    with pytest.raises(CovarianceFileError) as err:
        pave_purify_pool(base.state_dict(), sds, [CovarianceFile(files[0]), CovarianceFile(bad)],
                         target="weight", allocation="spectral", rho=0.75, store=CoSVDStore())
    assert re.search(_expect(bad, "fc1", fh.IN + 1, fh.IN, "1"), str(err.value)), str(err.value)
