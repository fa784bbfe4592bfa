"""mergekit's parallel execution (``--multi-gpu``) runs tensors of a ``pave`` merge concurrently:
the covariance cache and the rank report are shared between its worker threads. Driven on the CPU
with mergekit's own ``MultiGPUExecutor`` (its island partition and thread pool; only the CUDA
stream of each worker is left out), the merged weights and the rank report must equal a serial
merge's byte for byte."""

from __future__ import annotations

import threading
import time
import zlib

import pytest
import yaml

from mergekit_helpers import build_family, load_tensors, write_covariances

WORKERS = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    base, fts = build_family("llama", root, n_models=2)
    covs = [write_covariances(d, root / f"cov{i}.safetensors", seed=20 + i) for i, d in enumerate(fts)]
    models = "\n".join(f"  - model: {ft}\n    parameters: {{weight: 1.0, density: 0.5, covariance: {c}}}"
                       for ft, c in zip(fts, covs))
    recipe = (f"merge_method: pave\nbase_model: {base}\nmodels:\n{models}\n"
              "parameters:\n  inner: ties\n  rho: 0.875\n  lambda: 0.9\ndtype: float32\n")
    return root, recipe


def _merge(recipe: str, out, multi_gpu: bool) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(yaml.safe_load(recipe))
    run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=False, quiet=True, multi_gpu=multi_gpu),
              config_source=recipe)


@pytest.fixture
def cpu_multi_gpu_executor(monkeypatch):
    """mergekit's MultiGPUExecutor with ``WORKERS`` CPU 'devices'; threads actually seen are recorded."""
    import mergekit.multigpu_executor as mge
    from mergekit.graph import Executor

    threads: set[int] = set()

    def device_worker(self, task_list, cached_values, device, quiet):
        # mergekit's _device_worker without the CUDA stream and synchronize
        threads.add(threading.get_ident())
        ex = Executor(targets=task_list, math_device=device, storage_device=self.storage_device or device,
                      cached_values=cached_values)
        for handle, result in ex._run(quiet=quiet):
            if not (handle in self.targets or handle in self.trailing_dependencies):
                result = None
            self.task_completion_queue.put((handle._index, result))

    monkeypatch.setattr(mge, "get_torch_accelerator_count", lambda *a, **k: WORKERS)
    monkeypatch.setattr(mge, "get_torch_accelerator_type", lambda *a, **k: "cpu")
    monkeypatch.setattr(mge.MultiGPUExecutor, "_device_worker", device_worker)
    return threads


@pytest.fixture
def shuffled_finish_order(monkeypatch):
    """Tensors finish out of the serial order: a delay that depends on the tensor's name."""
    from pave_plugins.mergekit.pave import PaveMerge

    original = PaveMerge.merge_group

    def slow_merge_group(self, group, /, **params):
        time.sleep(0.002 * (zlib.crc32((group.metadata.name or "").encode()) % 20))
        return original(self, group, **params)

    monkeypatch.setattr(PaveMerge, "merge_group", slow_merge_group)


def test_parallel_merge_equals_serial_weights_and_report(family, cpu_multi_gpu_executor, shuffled_finish_order):
    root, recipe = family
    serial, parallel = root / "serial", root / "parallel"
    _merge(recipe, serial, multi_gpu=False)
    _merge(recipe, parallel, multi_gpu=True)
    assert len(cpu_multi_gpu_executor) > 1, "the merge did not run on several threads"
    a, b = load_tensors(serial), load_tensors(parallel)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].equal(b[name]), name
    report_serial = (serial / "pave_rank_report.json").read_bytes()
    report_parallel = (parallel / "pave_rank_report.json").read_bytes()
    assert b'"complete": true' in report_parallel
    assert report_parallel == report_serial
