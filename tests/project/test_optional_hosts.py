"""mergekit and FusionBench are optional extras: everything works with either host alone or none.

Each case runs in a fresh interpreter in which the missing host cannot be imported
(``sys.modules[name] = None``: ``import`` raises ``ModuleNotFoundError`` and
``importlib.util.find_spec`` returns ``None``, as when the package is not installed).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pave_plugins.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run_demo(root, num_tasks=2, steps=5)
    return root


def run_without(hosts: list[str], code: str, tmp_path) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + "".join(f"sys.modules[{h!r}] = None\n" for h in hosts)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_no_host_core_commands_work_and_host_commands_say_which_extra(demo, tmp_path):
    code = f"""
    import logging
    from pave_plugins.cli import main
    from pave_plugins.hosts import HostMissingError
    d = {str(demo)!r}
    assert main(["collect", "--model", d + "/ft_task_0", "--data", d + "/data/task_0.jsonl", "--no-progress",
                 "-o", "c.safetensors"]) == 0
    assert main(["purify", "--base", d + "/base", "--model", d + "/ft_task_0", "--covariance", "c.safetensors",
                 "--model", d + "/ft_task_1", "--covariance", d + "/covs/task_1.safetensors", "--out", "purified"]) == 0
    assert main(["rethink", "--no-progress", "--base", d + "/base", "--merged", "purified/ft_task_0",
                 "--tokenizer", d + "/base", "--calib", d + "/data/task_0.jsonl", "--epochs", "1",
                 "--iterations", "1", "--out", "rethought"]) == 0
    assert main(["demo", "--tasks", "2", "--steps", "1"]) == 2
    assert main(["bench", "--device", "cpu"]) == 2
    for module in ("pave_plugins.mergekit", "pave_plugins.fusion_bench"):
        try:
            __import__(module)
        except HostMissingError as exc:
            print("IMPORT", module, exc)
        else:
            raise AssertionError(module + " imported without its host")
    assert "mergekit" not in sys.modules or sys.modules["mergekit"] is None
    """
    proc = run_without(["mergekit", "fusion_bench"], code, tmp_path)
    err = proc.stderr
    assert "pave demo (it merges with mergekit) needs mergekit, which is not installed: " \
           "pip install 'pave-plugins[mergekit]'" in err
    assert "pave bench (it merges through FusionBench) needs FusionBench" in err and "[fusion-bench]" in err
    assert "IMPORT pave_plugins.mergekit pave_plugins.mergekit needs mergekit" in proc.stdout
    assert "IMPORT pave_plugins.fusion_bench pave_plugins.fusion_bench needs FusionBench" in proc.stdout
    assert "Traceback" not in err


def test_mergekit_alone_discovers_and_merges(demo, tmp_path):
    code = f"""
    from mergekit.merge_methods import registry
    names = {{m.spec.name for m in registry.registered_methods()}}
    assert {{"pave", "tsv"}} <= names, names
    from pave_plugins.demo import merge_with_mergekit
    from pathlib import Path
    recipe = Path({str(demo)!r}, "mergekit", "pave_ties.yaml").read_text()
    out = merge_with_mergekit(recipe, Path("merged"))
    assert (out / "pave_rank_report.json").is_file()
    assert sys.modules.get("fusion_bench") is None
    print("OK")
    """
    assert "OK" in run_without(["fusion_bench"], code, tmp_path).stdout


def test_fusion_bench_alone_runs_our_algorithms(tmp_path):
    code = """
    import copy, torch
    from fusion_bench import BaseModelPool
    from pave_plugins.fusion_bench import TSVMerging
    import hydra_plugins.pave_plugins  # the search-path plugin the fusion_bench CLI loads
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    fts = {}
    for name in ("a", "b"):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        fts[name] = m
    merged = TSVMerging(alpha=1.0).run(BaseModelPool({"_pretrained_": base, **fts}))
    assert merged(torch.randn(2, 8)).shape == (2, 4)
    assert sys.modules.get("mergekit") is None
    print("OK")
    """
    assert "OK" in run_without(["mergekit"], code, tmp_path).stdout
