"""mergekit's own tests pass unchanged with this package installed.

mergekit 0.1.5's test suite calls every registered merge method (``pave``, ``tsv`` and ``regmean``
are registered by this package) through ``merge_state_dicts``, without covariances. Its sdist is
fetched from the package index (``pip download``; cached under the user's cache folder) and the
test files that run every registered method are run against the installed mergekit, with the
tests folder copied apart so that the sdist's own ``mergekit`` source is not imported instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

MERGEKIT = "mergekit==0.1.5"
SUITE = ("tests/test_merge_method_regressions.py", "tests/test_merge_method_interface.py")


def _cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pave_plugins" / "host-suites"


@pytest.fixture(scope="module")
def mergekit_tests(tmp_path_factory) -> Path:
    cache = _cache()
    sdist = cache / "mergekit-0.1.5.tar.gz"
    if not sdist.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", MERGEKIT, "--no-binary", ":all:", "--no-deps",
                        "-d", str(cache)], check=True, timeout=600)
    work = tmp_path_factory.mktemp("mergekit-suite")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("mergekit-0.1.5/tests/")]
        try:
            tar.extractall(work, members=members, filter="data")
        except TypeError:  # Python before 3.11.4: no extraction filters (the members are plain files)
            tar.extractall(work, members=members)
    shutil.move(str(work / "mergekit-0.1.5" / "tests"), str(work / "tests"))
    return work


def test_mergekit_suite_passes_with_the_plugins_installed(mergekit_tests):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *SUITE],
                       cwd=mergekit_tests, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # our methods were among those it ran
    for method in ("pave", "tsv", "regmean"):
        assert f"PASSED tests/test_merge_method_regressions.py::" \
               f"test_state_dict_methods_accept_strided_weights_without_mutation[{method}]" in r.stdout, method
