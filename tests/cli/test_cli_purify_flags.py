"""`pave purify` flags through ``pave_plugins.cli.main``, each checked by its effect on the written
checkpoints against independent computations: PAVE eq. 5 with an explicit inverse in float64,
Algorithm 1 transcribed line by line, the uniform baseline's floor(rho R), transformers' own loader."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from mergekit_helpers import build_family, load_tensors, write_covariances
from safetensors import safe_open
from independent_reference import literal_algorithm_1

from pave_plugins.cli import main
from pave_plugins.io.covariance import (
    CovarianceFile,
    CovarianceMetadata,
    save_covariances,
)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("purify_flags")
    base, fts = build_family("llama", root, n_models=2)
    covs = [
        write_covariances(d, root / f"cov{i}.safetensors", seed=20 + i)
        for i, d in enumerate(fts)
    ]
    steepen(
        covs[1]
    )  # unlike spectra: Algorithm 1 takes more rank from model 1, so gamma can bind
    return {"root": root, "base": base, "fts": fts, "covs": covs}


def steepen(path: Path) -> None:
    """C -> D C D with D = diag(logspace(0, -3)): a faster decaying activation spectrum."""
    f = CovarianceFile(path)
    with safe_open(str(path), framework="pt") as st:
        names = st.keys()
        tensors = {k: st.get_tensor(k) for k in names}
    for k, c in tensors.items():
        d = torch.logspace(0, -3, c.shape[0], dtype=c.dtype)
        tensors[k] = d[:, None] * c * d[None, :]
    save_covariances(
        path, tensors, CovarianceMetadata(layer_map=f.metadata.layer_map, n_tokens=1)
    )


def argv(fam, out: Path, *extra: str) -> list[str]:
    args = ["purify", "--base", str(fam["base"])]
    for m, c in zip(fam["fts"], fam["covs"]):
        args += ["--model", str(m), "--covariance", str(c)]
    return [*args, "--out", str(out), *extra]


def eq5(w_ft: torch.Tensor, c: torch.Tensor, rank: int) -> torch.Tensor:
    """SVD_r(W C) C^{-1}, float64, explicit inverse."""
    w, c = w_ft.double(), c.double()
    u, s, vh = torch.linalg.svd(w @ c, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(c)


def purified_layers(fam):
    cfs = [CovarianceFile(c) for c in fam["covs"]]
    names = [n for n in load_tensors(fam["base"]) if n in cfs[0]]
    assert len(names) == 14
    return names, cfs


def check_against_reference(fam, out: Path, *, target: str, ranks_of, tol=(1e-5, 2e-6)):
    """Every purified tensor of every model equals the float64 reference at the ranks ``ranks_of``
    gives for the layer; returns {tensor: ranks} read from the report."""
    base = load_tensors(fam["base"])
    fts = [load_tensors(d) for d in fam["fts"]]
    outs = [load_tensors(out / d.name) for d in fam["fts"]]
    report = json.loads((out / "pave_rank_report.json").read_text())
    names, cfs = purified_layers(fam)
    for name in names:
        b = base[name].double()
        mats = [
            ft[name].double() - b if target == "delta" else ft[name].double()
            for ft in fts
        ]
        covs = [cf.get(name).double() for cf in cfs]
        ranks = ranks_of(
            [torch.linalg.svdvals(m @ c) for m, c in zip(mats, covs)], min(b.shape)
        )
        for i, (m, c) in enumerate(zip(mats, covs)):
            ref = eq5(m, c, ranks[i]) + (b if target == "delta" else 0)
            torch.testing.assert_close(
                outs[i][name].double(), ref, rtol=tol[0], atol=tol[1], msg=name
            )
            assert (
                report["tensors"][name]["models"][fam["fts"][i].name]["rank"]
                == ranks[i]
            )
    for name in base:  # no covariance: the fine-tuned tensor, bit for bit
        if name not in names:
            assert all(torch.equal(o[name], ft[name]) for o, ft in zip(outs, fts)), name
    return report


def test_rho_gamma_spectral(fam, tmp_path):
    """--rho 0.6 --gamma 0.59: Algorithm 1 with that floor, which binds (the default gamma gives
    other ranks on the same spectra)."""
    out = tmp_path / "out"
    assert (
        main(
            argv(
                fam,
                out,
                "--rho",
                "0.6",
                "--gamma",
                "0.59",
                "--rank-allocation",
                "spectral",
            )
        )
        == 0
    )

    def alg1(svals, full):
        ranks = literal_algorithm_1([s.tolist() for s in svals], 0.6, 0.59)
        return ranks

    report = check_against_reference(fam, out, target="weight", ranks_of=alg1)
    assert report["settings"]["rho"] == 0.6 and report["settings"]["gamma"] == 0.59
    names, cfs = purified_layers(fam)
    fts = [load_tensors(d) for d in fam["fts"]]
    differs = 0
    for name in names:
        svals = [
            torch.linalg.svdvals(ft[name].double() @ cf.get(name).double()).tolist()
            for ft, cf in zip(fts, cfs)
        ]
        differs += literal_algorithm_1(svals, 0.6, 0.59) != literal_algorithm_1(
            svals, 0.6, 0.6 - 0.4 / 2
        )
    assert differs > 0


def test_rank_allocation_uniform(fam, tmp_path):
    out = tmp_path / "out"
    assert main(argv(fam, out, "--rho", "0.75", "--rank-allocation", "uniform")) == 0
    report = check_against_reference(
        fam,
        out,
        target="weight",
        ranks_of=lambda svals, full: [math.floor(0.75 * full)] * len(svals),
    )
    assert report["settings"]["rank_allocation"] == "uniform"


def test_target_delta(fam, tmp_path):
    """--target delta: SVD_r(dW C) C^{-1} added to the base, ranks by Algorithm 1 on sigma(dW C)."""
    out = tmp_path / "out"
    assert main(argv(fam, out, "--rho", "0.75", "--target", "delta")) == 0

    def alg1(svals, full):
        return literal_algorithm_1([s.tolist() for s in svals], 0.75, 0.75 - 0.25 / 2)

    report = check_against_reference(fam, out, target="delta", ranks_of=alg1)
    assert report["settings"]["target"] == "delta"


def test_compute_dtype_float32_and_device(fam, tmp_path, capsys):
    """float32 maths: the reference to float32 accuracy, not the float64 result bit for bit;
    --device cpu is the default's result bit for bit; an unknown device is refused by main."""
    a, b, c = tmp_path / "f64", tmp_path / "f32", tmp_path / "cpu"
    assert main(argv(fam, a, "--rho", "0.75")) == 0
    assert main(argv(fam, b, "--rho", "0.75", "--compute-dtype", "float32")) == 0
    assert (
        main(
            argv(
                fam, c, "--rho", "0.75", "--compute-dtype", "float64", "--device", "cpu"
            )
        )
        == 0
    )
    names, _ = purified_layers(fam)
    for i, d in enumerate(fam["fts"]):
        w64, w32, wcpu = (load_tensors(x / d.name) for x in (a, b, c))
        assert all(torch.equal(w64[k], wcpu[k]) for k in w64)
        assert any(not torch.equal(w64[k], w32[k]) for k in names)
        if (
            i == 0
        ):  # cond(C) ~ 1e4 (model 1's steepened C is beyond float32, as documented)
            for k in names:
                torch.testing.assert_close(w32[k], w64[k], rtol=1e-3, atol=1e-4)
    assert (
        json.loads((b / "pave_rank_report.json").read_text())["settings"][
            "compute_dtype"
        ]
        == "float32"
    )
    with pytest.raises(SystemExit) as err:  # refused by the parser, naming the flag
        main(argv(fam, tmp_path / "bad", "--device", "nodevice"))
    assert err.value.code == 2
    assert "argument --device" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_max_shard_size_writes_loadable_shards(fam, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(argv(fam, whole, "--rho", "0.75")) == 0
    total = sum(
        f.stat().st_size for f in (whole / fam["fts"][0].name).glob("*.safetensors")
    )
    limit = total // 4
    assert (
        main(argv(fam, sharded, "--rho", "0.75", "--max-shard-size", str(limit))) == 0
    )
    from transformers import AutoModelForCausalLM

    for d in fam["fts"]:
        folder = sharded / d.name
        shards = sorted(folder.glob("*.safetensors"))
        assert len(shards) >= 4, [s.name for s in shards]
        assert not (folder / "model.safetensors").exists()
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        ref = load_tensors(whole / d.name)
        assert set(index["weight_map"]) == set(ref)
        assert set(index["weight_map"].values()) == {s.name for s in shards}
        got = load_tensors(folder)
        assert got.keys() == ref.keys() and all(
            torch.equal(got[k], ref[k]) for k in ref
        )
        model = AutoModelForCausalLM.from_pretrained(folder)
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k]), k


def test_overwrite(fam, tmp_path, caplog):
    out = tmp_path / "out"
    assert main(argv(fam, out, "--rho", "0.75")) == 0
    first = json.loads((out / "pave_rank_report.json").read_text())
    with caplog.at_level(logging.ERROR, logger="pave"):
        assert main(argv(fam, out, "--rho", "0.875")) == 2
    assert (
        f"{out} already exists and is not empty (pass " in caplog.text
        and "overwrite to replace it)" in caplog.text
    )
    assert json.loads((out / "pave_rank_report.json").read_text()) == first
    assert main(argv(fam, out, "--rho", "0.875", "--overwrite")) == 0
    assert (
        json.loads((out / "pave_rank_report.json").read_text())["settings"]["rho"]
        == 0.875
    )


def test_verbose_flag_logs_debug(fam, tmp_path):
    """-v / --verbose: pave's loggers at DEBUG (INFO without it)."""
    assert main(argv(fam, tmp_path / "a", "--rho", "0.75")) == 0
    assert logging.getLogger("pave_plugins").level == logging.INFO
    for flag in ("-v", "--verbose"):
        logging.getLogger("pave_plugins").setLevel(logging.NOTSET)
        assert main([flag, *argv(fam, tmp_path / flag, "--rho", "0.75")]) == 0
        assert logging.getLogger("pave_plugins").level == logging.DEBUG
    logging.getLogger("pave_plugins").setLevel(logging.NOTSET)
    logging.getLogger("pave").setLevel(logging.NOTSET)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--rank-allocation", "greedy"), "invalid choice: 'greedy'"),
        (("--target", "bias"), "invalid choice: 'bias'"),
        (("--compute-dtype", "float16"), "invalid choice: 'float16'"),
        (("--max-shard-size", "1e9"), "not an integer: '1e9'"),
        (("--max-shard-size", "0"), "must be a positive integer, got 0"),
    ],
)
def test_parser_rejects_bad_values(fam, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as err:
        main(argv(fam, tmp_path / "out", *extra))
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
