"""Bad inputs, generated: never exit 0 with a wrong result.

hypothesis corrupts a covariance file (a NaN or Inf at a random entry, a negative eigenvalue of a
random size, an asymmetry, a dropped layer, integer storage, truncated bytes, metadata of the wrong
JSON types), a mergekit recipe (each PAVE parameter at and beyond its bounds, wrong types) and
data files (encodings, BOMs, CRLF, a missing field at a random row). Property: ``pave`` exits 2 with
one ``ERROR`` line naming the file (and the layer or row or parameter), or exits 0 with the result
the uncorrupted input gives; no traceback.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from inputs_helpers import purify_argv
from inputs_helpers import run_pave

SLOW = settings(deadline=None, max_examples=max(10, settings().max_examples // 3),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])




def fresh(tmp_path: Path, name: str) -> Path:
    import shutil

    d = tmp_path / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


# ------------------------------------------------------------------------ covariance files
KINDS = ["nan", "inf", "negative eigenvalue", "asymmetric", "drop layer", "int storage", "truncate",
         "metadata type", "scaled (benign)"]


def _corrupt(src: Path, dst: Path, kind: str, data) -> str | None:
    """Write a corrupted copy of covariance file ``src``; the tensor key it changed, if one."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    key = data.draw(st.sampled_from(sorted(tensors)), label="key")
    c = tensors[key].clone()
    n = c.shape[0]
    if kind in ("nan", "inf"):
        i, j = data.draw(st.integers(0, n - 1), label="i"), data.draw(st.integers(0, n - 1), label="j")
        c[i, j] = c[j, i] = float("nan") if kind == "nan" else data.draw(st.sampled_from([math.inf, -math.inf]))
    elif kind == "negative eigenvalue":
        size = data.draw(st.floats(0.02, 3.0), label="size")  # x mean(diag C), beyond float64's 1e-4
        eig, q = torch.linalg.eigh(c.double())
        eig[0] = -size * float(c.double().diagonal().mean())
        c = ((q * eig) @ q.T).to(c.dtype)
        c = 0.5 * (c + c.T)
    elif kind == "asymmetric":
        i = data.draw(st.integers(0, n - 2), label="i")
        c[i, i + 1] += data.draw(st.floats(0.01, 2.0), label="amount") * float(c.abs().max())
    elif kind == "int storage":
        c = c.round().to(torch.int32)
    elif kind == "scaled (benign)":
        c = c * data.draw(st.sampled_from([0.5, 2.0, 1024.0]), label="scale")
    tensors[key] = c
    if kind == "drop layer":
        layer_map = json.loads(meta["layer_map"])
        layer_map = {k: v for k, v in layer_map.items() if v != key}
        meta["layer_map"] = json.dumps(layer_map)
        tensors.pop(key)
    if kind == "metadata type":
        field, value = data.draw(st.sampled_from([("layer_map", "[1, 2]"), ("layer_map", '{"a": 3}'),
                                                  ("counts", '{"cov.0": "many"}'), ("counts", "[]"),
                                                  ("n_tokens", "lots"), ("extra", "[]"), ("max_length", "-3")]))
        meta[field] = value
    save_file(tensors, str(dst), metadata=meta)
    if kind == "truncate":
        raw = dst.read_bytes()
        dst.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")])
    return key


@SLOW
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_a_corrupted_covariance_file_is_refused_naming_it_or_gives_the_right_result(env, tmp_path, kind, data):  # noqa: F811
    work = fresh(tmp_path, "w")
    bad = work / "bad.safetensors"
    _corrupt(env["covs"][1], bad, kind, data)
    out = work / "out"
    code, errors, text = run_pave(purify_argv(env, out, covs=[env["covs"][0], bad]))
    assert "Traceback" not in text
    if code == 0:
        # only what leaves the maths unchanged may pass: PAVE's subspace of W C is the same for any
        # positive multiple of C, so the purified weights equal those of the intact file
        assert kind == "scaled (benign)", (kind, text[-500:])
        ref = fresh(tmp_path, "ref") / "out"
        assert run_pave(purify_argv(env, ref))[0] == 0
        name = env["fts"][1].name
        got, want = load_file(str(out / name / "model.safetensors")), load_file(str(ref / name / "model.safetensors"))
        for k in want:
            assert torch.allclose(got[k].double(), want[k].double(), rtol=1e-4, atol=1e-6), k
    else:
        assert kind != "scaled (benign)" and code == 2, (kind, text[-500:])
        assert len(errors) == 1 and "\n" not in errors[0] and str(bad) in errors[0], errors
        if kind in ("nan", "inf", "negative eigenvalue", "asymmetric"):
            assert re.search(r"\(layer 'model\.\S+'\)", errors[0]), errors[0]
        assert not out.exists()


# ---------------------------------------------------------------------------- recipes
PAVE_PARAMS = {
    "rho": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1),
    "gamma": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 0.875),
    "rank_allocation": (lambda v: v in ("spectral", "uniform")),
    "target": (lambda v: v in ("weight", "delta")),
    "compute_dtype": (lambda v: v in ("float64", "float32")),
    "damping": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0),
    # the authors' rule needs a damping > 0 and the recipe leaves it at 0: refused at planning too
    "damping_rule": (lambda v: v == "relative"),
    "rank_granularity": (lambda v: v in ("layer", "model")),
}
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3),
                   st.sampled_from([0.0, 1.0, 0.875, 0.8749, 1.0000001, -0.0, "spectral", "uniform", "weight", "delta",
                                    "float64", "float32", "even", "", None, True, [0.5], {"a": 1}, "relative",
                                    "authors", "layer", "model", 1e-3]))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(param=st.sampled_from(sorted(PAVE_PARAMS)), value=VALUES)
def test_every_pave_recipe_parameter_is_checked_at_planning(param, value):
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry

    from pave_plugins.mergekit.recipe import RecipeParameterError, check_recipe

    assume(not (param in ("rho", "gamma") and value is None))  # unset: the default
    assume(not isinstance(value, (list, dict)))  # mergekit's gradients and filters: resolved by mergekit
    recipe = {"merge_method": "pave", "base_model": "base", "dtype": "float32",
              "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}],
              "parameters": {"rho": 0.875, param: value}}
    try:
        config = MergeConfiguration.model_validate(recipe)
    except Exception:  # mergekit's own schema refused it (e.g. NaN in YAML-incompatible form)
        return
    ok = PAVE_PARAMS[param](value)
    if ok:
        check_recipe(config, registry.get("pave"))
    else:
        with pytest.raises(RecipeParameterError, match=rf"^pave recipe \(the recipe's global `parameters`\): {param}"):
            check_recipe(config, registry.get("pave"))


# ------------------------------------------------------------------------------ data files
WORDS = st.text(alphabet=st.sampled_from(list("abcdefghij ,\"'éü中\t")), min_size=1, max_size=12).filter(
    lambda t: t.strip() and t == t.strip())


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(WORDS, min_size=1, max_size=6), fmt=st.sampled_from(["jsonl", "csv", "tsv", "txt"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]), crlf=st.booleans(),
       drop=st.one_of(st.none(), st.integers(0, 5)))
def test_a_data_file_is_read_as_written_or_refused_naming_it(tmp_path, texts, fmt, encoding, crlf, drop):
    """Whatever the encoding, byte-order mark, line ends or a row missing its field: the texts read
    are exactly those written, or a DataError names the file and the line or row."""
    import csv
    import io

    from pave_plugins.collect.data import DataError, load_texts

    if fmt == "txt":
        assume(all("\n" not in t and "\r" not in t for t in texts))
        drop = None
    if fmt in ("csv", "tsv"):
        assume(all("\t" not in t for t in texts) if fmt == "tsv" else True)
    drop = drop if drop is not None and drop < len(texts) else None
    rows = [{"text": t, "label": i} if i != drop else {"label": i} for i, t in enumerate(texts)]
    nl = "\r\n" if crlf else "\n"
    if fmt == "jsonl":
        body = nl.join(json.dumps(r, ensure_ascii=False) for r in rows) + nl
    elif fmt == "txt":
        body = nl.join(texts) + nl
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["text", "label"], delimiter="\t" if fmt == "tsv" else ",", lineterminator=nl)
        w.writeheader()
        for r in rows:
            w.writerow(r)  # a dropped field is an empty cell in CSV
        body = buf.getvalue()
    path = tmp_path / f"d.{fmt}"
    try:
        path.write_bytes(body.encode(encoding))
    except UnicodeEncodeError:
        assume(False)
    try:
        got = load_texts(path, n_samples=None)
    except DataError as exc:
        msg = str(exc)
        assert str(path) in msg and "\n" not in msg, msg
        non_utf8 = encoding in ("latin-1", "utf-16") and body.encode(encoding) != body.encode("utf-8")
        nothing_left = drop is not None and len(texts) == 1  # the one row lost its text: no text at all
        assert non_utf8 or nothing_left or (drop is not None and fmt == "jsonl"), msg
        if drop is not None and fmt == "jsonl" and not (non_utf8 or nothing_left):
            assert f"row {drop + 1} has no field 'text'" in msg, msg
        return
    assert not (encoding in ("latin-1", "utf-16") and body.encode(encoding) != body.encode("utf-8"))
    want = [t for i, t in enumerate(texts) if i != drop or fmt in ("txt",)]
    if fmt in ("csv", "tsv") and drop is not None:
        want = [t for i, t in enumerate(texts) if i != drop]  # the empty cell: an empty text, skipped
    assert got == want


FLOAT_PARAMS = {"pave": [("model", "weight"), ("model", "density"), ("global", "lambda"), ("global", "alpha")],
                "tsv": [("global", "alpha")], "regmean": [("global", "lambda")]}


@settings(deadline=None)
@given(method=st.sampled_from(sorted(FLOAT_PARAMS)), data=st.data(),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.integers(-5, 5)))
def test_every_number_of_our_mergekit_methods_is_finite_at_planning(method, data, value):
    """``.nan`` or ``.inf`` anywhere a recipe of pave / tsv / regmean takes a number merges into NaN
    weights: refused at planning, naming the parameter; finite numbers pass the check."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry

    from pave_plugins.mergekit.recipe import RecipeParameterError, check_recipe

    where, param = data.draw(st.sampled_from(FLOAT_PARAMS[method]))
    models = [{"model": m, "parameters": {}} for m in ("a", "b")]
    recipe = {"merge_method": method, "base_model": "base", "dtype": "float32", "models": models, "parameters": {}}
    (models[0]["parameters"] if where == "model" else recipe["parameters"])[param] = value
    config = MergeConfiguration.model_validate(recipe)
    ok = not isinstance(value, bool) and math.isfinite(value)
    if ok:
        check_recipe(config, registry.get(method))
    else:
        with pytest.raises(RecipeParameterError, match=rf"^{method} recipe \(.*\): {param}: must be a"):
            check_recipe(config, registry.get(method))
