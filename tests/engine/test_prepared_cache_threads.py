"""The prepared-covariance cache under worker threads (mergekit ``--multi-gpu``): threads asking for
different covariances factorise them at the same time; threads asking for the same one share a
single factorisation."""

from __future__ import annotations

import threading

import torch

from pave_plugins.io.sources import PreparedCache


class SlowSource:
    """A covariance source whose reads meet at a barrier: a read that cannot start while another
    is in progress breaks the barrier (after the timeout) instead of deadlocking the test."""

    origin = "in-memory test source"

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=10)
        self.reads: list[str] = []

    def key_for(self, name: str) -> str:
        return name.split(".")[0]

    def get(self, name: str, *, device=None) -> torch.Tensor:
        self.reads.append(name)
        self.barrier.wait()
        n = 4 + len(self.key_for(name))
        x = torch.arange(1, 3 * n * n + 1, dtype=torch.float64).reshape(3 * n, n).sin()
        return x.T @ x


def run_threads(cache: PreparedCache, source, names: list[str]) -> list:
    results: list = [None] * len(names)
    errors: list[BaseException] = []

    def work(i: int, name: str) -> None:
        try:
            results[i] = cache.get(source, name, device="cpu", compute_dtype=torch.float64)[0]
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_different_covariances_prepare_concurrently():
    """Both reads must be in progress at once to pass the barrier: a cache that held its lock
    while preparing would serialise them and break it."""
    source = SlowSource(parties=2)
    cache = PreparedCache()
    a, b = run_threads(cache, source, ["q.weight", "down.weight"])
    assert cache.n_prepared == 2 and sorted(source.reads) == ["down.weight", "q.weight"]
    assert a.matrix.shape == (5, 5) and b.matrix.shape == (8, 8)


def test_one_covariance_is_prepared_once_for_all_threads():
    source = SlowSource(parties=1)
    cache = PreparedCache()
    got = run_threads(cache, source, ["q.weight", "q.bias", "q.weight", "q.proj"] * 2)
    assert cache.n_prepared == 1 and len(source.reads) == 1
    assert all(p is got[0] for p in got)
