"""Every place in the package that writes to the file system, and how it goes through the one output
transaction (:mod:`pave_plugins.io.output`).

The source is scanned for calls that create, change or remove files (``save_pretrained``,
``save_file``, ``write_text``, ``torch.save``, ``open(..., "w")``, ``shutil.copy2``, ``mkdir``,
``unlink``, ...). Each function holding one must be listed in :data:`WRITERS`, with how it is safe:

- ``"transaction"``: the call is inside ``with output_folder(...)``, ``with output_file(...)`` or
  ``with <OwnedFolder>.file(...)`` in that same function (checked on the syntax tree);
- ``"staging"``: a helper that writes only under a path its caller takes from a transaction (the
  callers are named);
- anything else is an explained exception (a private scratch folder, mergekit's own folder).

A new writer fails this test until it is routed through the transaction or listed with a reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pave_plugins"
TRANSACTION_MODULE = "io/output.py"

WRITE_METHODS = {"save_pretrained", "save_file", "write_text", "write_bytes", "savefig", "copy2", "copyfile",
                 "copytree", "rmtree", "unlink", "rename", "mkdir", "makedirs", "symlink", "chmod", "save_tensor",
                 "finalize"}
MODULE_CALLS = {("torch", "save"), ("json", "dump"), ("os", "replace"), ("os", "remove"), ("shutil", "move")}
TRANSACTIONS = {"output_folder", "output_file", "file"}

WRITERS: dict[str, str] = {
    # the commands and faces
    "cli/purify.py:_write_purified": "transaction",
    "cli/purify.py:_copy_side_files": "staging: called by _write_purified with the output_folder stage",
    "rethink/hf.py:_save": "transaction",
    "rethink/output.py:save_lambdas": "transaction",
    "io/covariance.py:save_covariances": "transaction",
    "engine/report.py:MergeReport.write": "transaction",
    "fusion_bench/outputs.py:write_model_card": "transaction",
    "fusion_bench/outputs.py:write_json": "transaction",
    "fusion_bench/pave.py:PAVEAlgorithm.save_modulated": "host: FusionBench's merged_model_save_path (checked apart "
                                                         "from the pool's inputs first) and FusionBench's own "
                                                         "save_model per task; a file save goes through output_file",
    "bench/harness.py:write_results": "transaction",
    "bench/harness.py:plot": "transaction",
    "bench/training.py:finetune": "transaction",
    "bench/lora_experts.py:save_hf_folder": "transaction",
    "bench/lora_experts.py:finetune_lora": "transaction",
    # helpers that write under the stage they are given
    "demo/run.py:relocate_text": "staging: called by run_demo on the output_folder stage",
    "demo/run.py:merge_with_mergekit": "staging: called by _run_demo on its stage (the stock merge's model card)",
    "demo/run.py:_fine_tunes": "staging: called by _run_demo (under run_demo's stage, or a temporary folder)",
    "demo/run.py:_run_demo": "staging: called by run_demo with the stage or a TemporaryDirectory",
    "demo/folder.py:write_calibration": "staging: called by demo/run.py:_fine_tunes",
    "demo/folder.py:write_fusion_bench_configs": "staging: called by demo/run.py:_run_demo",
    "demo/folder.py:write_bench_inputs": "staging: called by demo/run.py:_run_demo",
    "demo/folder.py:_tiny_bert": "staging: called by write_bench_inputs",
    "io/checkpoints.py:ShardedWriter.__init__": "staging: pave purify creates it on its output_folder stage",
    "io/checkpoints.py:ShardedWriter._flush": "staging: as ShardedWriter.__init__",
    "io/checkpoints.py:ShardedWriter.finalize": "staging: as ShardedWriter.__init__",
    "cli/purify.py:_write_purified.write#save_tensor": "staging: ShardedWriter on the stage (the engine run calls it)",
    # explained exceptions
    "mergekit/report.py:_remove": "mergekit's own output folder: a stale report of ours (format checked) is retired "
                                  "when a stock merge replaces the model it described",
    "bench/lora_experts.py:run_mergekit": "a private mkdtemp scratch folder of the benchmark, removed after reading",
}


def _calls(tree: ast.AST):
    """(qualified function name, call node, chain of enclosing nodes) of every write call."""
    found = []

    def visit(node, qual, chain):
        for child in ast.iter_child_nodes(node):
            q = qual
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = f"{qual}.{child.name}" if qual else child.name
            if isinstance(child, ast.Call) and _is_write(child):
                found.append((q, child, chain + [child]))
            visit(child, q, chain + [child])

    visit(tree, "", [])
    return found


def _is_write(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute):
        if isinstance(f.value, ast.Name) and (f.value.id, f.attr) in MODULE_CALLS:
            return True
        return f.attr in WRITE_METHODS
    if isinstance(f, ast.Name) and f.id == "open":
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
    return isinstance(f, ast.Name) and f.id in {"save_file", "copy2", "rmtree", "copyfile", "copytree"}


def _in_transaction(chain) -> bool:
    for node in chain:
        if isinstance(node, ast.With):
            for item in node.items:
                expr = item.context_expr
                if isinstance(expr, ast.Call):
                    name = expr.func.attr if isinstance(expr.func, ast.Attribute) else getattr(expr.func, "id", "")
                    if name in TRANSACTIONS:
                        return True
    return False


def _scan() -> dict[str, list[tuple[int, bool]]]:
    sites: dict[str, list[tuple[int, bool]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == TRANSACTION_MODULE:
            continue
        for qual, call, chain in _calls(ast.parse(path.read_text(), filename=str(path))):
            fn = qual.rsplit(".", 1)[0] if qual.endswith(">") else qual
            key = f"{rel}:{fn}"
            if isinstance(call.func, ast.Attribute) and call.func.attr == "save_tensor":
                key += "#save_tensor"
            sites.setdefault(key, []).append((call.lineno, _in_transaction(chain)))
    return sites


def test_every_writer_is_listed_with_how_it_goes_through_the_transaction():
    sites = _scan()
    new = {k: v for k, v in sites.items() if k not in WRITERS}
    assert not new, ("writes outside the output transaction: " + "; ".join(
        f"{k} (line {v[0][0]})" for k, v in new.items()) + ": route them through pave_plugins.io.output "
        "(output_folder / output_file / OwnedFolder) or list them in WRITERS with the reason")
    gone = sorted(set(WRITERS) - set(sites))
    assert not gone, f"WRITERS lists functions that no longer write: {gone}"


def test_writers_said_to_use_the_transaction_do_so_where_they_write():
    sites = _scan()
    outside = {k: [ln for ln, inside in v if not inside] for k, v in sites.items() if WRITERS.get(k) == "transaction"}
    assert not any(outside.values()), f"writes outside `with output_*(...)`: { {k: v for k, v in outside.items() if v} }"


def test_every_command_that_writes_imports_the_transaction():
    for rel in ("cli/purify.py", "rethink/hf.py", "collect/pipeline.py", "demo/run.py", "cli/bench.py",
                "fusion_bench/outputs.py", "engine/report.py", "io/covariance.py"):
        assert "pave_plugins.io.output" in (PACKAGE / rel).read_text() or ".io.output" in (PACKAGE / rel).read_text(), rel
