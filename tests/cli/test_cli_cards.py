"""``pave purify`` and ``pave rethink`` outputs carry cards ready to publish: ``huggingface_hub.ModelCard``
reads ``library_name``, the method tags and ``base_model`` only as a Hub id; the text names no path of
this machine; a rethought model's card has its own title and describes the input merge, then LoRA-DV."""

from __future__ import annotations

import json
import re
import shutil

from huggingface_hub import ModelCard
from outputs_helpers import pave, purify_args, rethink_args

from pave_plugins import papers


def no_machine_path(text: str, *roots) -> None:
    for root in roots:
        assert str(root) not in text and str(root.resolve()) not in text
    assert not re.search(r"(?<![\w.:/~}-])/(tmp|home|root|work)/", text)


def test_purify_writes_each_model_its_own_card(own, tmp_path, capsys, caplog):
    (own["fts"][0] / "README.md").write_text("# my fine-tune\n")  # the fine-tune's card is not the purified one's
    out = tmp_path / "purified"
    code, err = pave(purify_args(own, out), capsys, caplog)
    assert code == 0, err
    report = json.loads((out / "pave_rank_report.json").read_text())
    names = [ft.name for ft in own["fts"]]
    assert report["models"] == names and list(report["model_ratios"]) == names
    for name in names:
        card = ModelCard.load(out / name / "README.md")
        assert card.data.library_name == "transformers" and card.data.tags == ["pave", "task-vector-purification"]
        assert card.data.base_model is None  # local folders: no Hub id
        assert f"# {name}\n" in card.content and "my fine-tune" not in card.content
        assert f"rho_i: {report['model_ratios'][name]:.4f}" in card.content
        assert f"]({papers.PAVE.url})" in card.content and f"covariance: {own['covs'][0].name}" in card.content
        no_machine_path(card.content, own["root"], tmp_path)


def test_rethink_of_a_merge_describes_the_pipeline(seq, tmp_path, capsys, caplog):
    merged = tmp_path / "my_merge"
    shutil.copytree(seq["root"] / "merged", merged)
    (merged / "README.md").write_text(
        f"---\nbase_model: org/tiny-bert\ntags:\n- merge\n- mergekit\n- pave\n---\n# my_merge\n\n"
        f"Merged from {seq['root']}/a and {seq['root']}/b.\n\n## Merge Details\n\nties inside\n")
    out = tmp_path / "rethought"
    argv = rethink_args(seq, out)
    argv[argv.index(seq["root"] / "merged")] = merged
    code, err = pave(argv, capsys, caplog)
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert card.data.tags == ["merge", "mergekit", "pave", "lora-dv"] and card.data.base_model == "org/tiny-bert"
    text = card.content
    assert "\n# rethought\n" in text and "# my_merge" not in text and "`my_merge`" in text
    assert text.index("## Stage 1: the input merge") < text.index("### Merge Details") < text.index("## Stage 2")
    assert "Merged from a and b." in text and "input merge -> LoRA-DV" in text
    no_machine_path(text, seq["root"], tmp_path)


def test_rethink_of_lora_adapters_has_a_card(tmp_path, capsys, caplog):
    from rethink_helpers import build_llama_lora

    adapters, calib = build_llama_lora(tmp_path)
    cfg = adapters["t0"] / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": "org/tiny-llama"}))
    out = tmp_path / "lora_dv"
    code, err = pave(["rethink", "--base", tmp_path / "base", "--lora", *[f"{t}={p}" for t, p in adapters.items()],
                      "--lora-weights", "0.5", "0.5", "--calib", calib, "--epochs", "1", "--iterations", "1",
                      "--no-progress", "--device", "cpu", "--out", out], capsys, caplog)
    assert code == 0, err
    card = ModelCard.load(out / "README.md")  # it had no metadata block before
    assert card.data.tags == ["merge", "lora-dv"] and card.data.base_model == "org/tiny-llama"
    assert card.data.library_name == "transformers" and "\n# lora_dv\n" in card.content
    assert "- `lora0` (task t0), weight 0.5" in card.content and "- `lora1` (task t1), weight 0.5" in card.content
    no_machine_path(card.content, tmp_path)
