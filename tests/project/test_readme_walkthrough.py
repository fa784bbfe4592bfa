"""The README's walk-through runs on a demo folder exactly as printed.

Every ``bash`` block of README.md that follows a ``<!-- demo -->`` marker is run, in order, in a
fresh working directory after the set-up's ``pave demo --out pave-demo``, with the ``pave``,
``mergekit-yaml`` and ``fusion_bench`` of this Python environment first on the PATH. Each must exit
with status 0 and print no traceback, no error (e.g. mergekit's "Failed to copy tokenizer") and none
of the warnings a newcomer would worry about (a deprecation, an unknown recipe parameter). Every model
folder it leaves loads with ``AutoModelForCausalLM`` and ``AutoTokenizer``, and its model card parses
(``huggingface_hub.ModelCard``) with ``library_name``, the host and method tags and no ``base_model``
(the demo's models are local), and names no path of this machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from outputs_helpers import check_publishable

README = Path(__file__).resolve().parents[2] / "README.md"


def demo_commands(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"<!-- demo -->\n```bash\n(.*?)```", text, re.S)]


def setup_demo_command(text: str) -> str:
    """The ``pave demo ...`` step of set-up command 1, without the ``.venv/bin/`` prefix."""
    m = re.search(r"\.venv/bin/(pave demo [^\n`&]*)", text)
    assert m, "README set-up has no `pave demo` step"
    return m.group(1).strip()


def test_readme_names_every_face():
    cmds = demo_commands(README.read_text())
    joined = "\n".join(cmds)
    for face in ("mergekit-yaml ", "fusion_bench ", "pave collect ", "pave purify ", "pave rethink ", "pave bench "):
        assert face in joined, f"no walk-through command for {face.strip()}"


def test_readme_walkthrough_runs_as_printed(tmp_path):
    text = README.read_text()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    for cmd in [setup_demo_command(text), *demo_commands(text)]:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{cmd}\n--- exit {proc.returncode}\n{out[-4000:]}"
        assert "Traceback" not in out and " ERROR " not in out, f"{cmd}\n{out[-4000:]}"
        for worry in ("deprecated", "unknown parameter"):
            assert worry not in out, f"{cmd}\n{out[-4000:]}"
    demo = tmp_path / "pave-demo" / "out"
    for produced in ("pave_ties/pave_rank_report.json", "fusion_bench/pave_rank_report.json", "task_0.safetensors",
                     "purified/pave_rank_report.json", "rethought/rethink.json", "bench/results.json"):
        assert (demo / produced).is_file(), produced

    for folder, tags in PUBLISHED.items():
        check_publishable(tmp_path / "pave-demo" / folder, tags, tmp_path)


#: the model folders of the walk-through and the tags their cards must carry
PUBLISHED = {
    "merged/task_arithmetic": {"merge", "mergekit"},
    "merged/pave_ta": {"merge", "mergekit", "pave", "task-arithmetic"},
    "merged/tsv_m": {"merge", "mergekit", "tsv-m"},
    "out/pave_ties": {"merge", "mergekit", "pave", "ties"},
    "out/fusion_bench/merged": {"merge", "fusion-bench", "pave", "task-arithmetic"},
    "out/purified/ft_task_0": {"pave"},
    "out/purified/ft_task_2": {"pave"},
    "out/rethought": {"merge", "mergekit", "pave", "lora-dv"},
}
