"""`explain` / `explain_vectors` on the embedded model with a trained AV and AR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from embedded_pipeline import SETTINGS, shared_run

from nla.api import resolve_positions
from nla.errors import NLAError
from nla.explain import explain, explain_vectors, format_records, load_vectors


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    return shared_run(tmp_path_factory)


def test_resolve_positions():
    special = [True, False, False, False]
    assert resolve_positions(4, None, special) == [3]
    assert resolve_positions(4, "all", special) == [1, 2, 3]
    assert resolve_positions(4, [0, -1, 2], special) == [0, 3, 2]
    with pytest.raises(NLAError, match="outside"):
        resolve_positions(4, [4], special)


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_load_vectors_formats(tmp_path, suffix):
    from safetensors.torch import save_file

    data = torch.randn(3, 5)
    path = tmp_path / f"v{suffix}"
    if suffix == ".npy":
        np.save(path, data.numpy())
    elif suffix == ".pt":
        torch.save({"vectors": data}, path)
    else:
        save_file({"vectors": data}, str(path))
    torch.testing.assert_close(load_vectors(path), data)
    if suffix != ".npy":
        torch.testing.assert_close(load_vectors(path, "vectors"), data)
        with pytest.raises(NLAError, match="no tensor"):
            load_vectors(path, "missing")
    torch.save(data[0], tmp_path / "one.pt")
    assert load_vectors(tmp_path / "one.pt").shape == (1, 5)
    with pytest.raises(NLAError, match="unknown vector file"):
        (tmp_path / "v.txt").write_text("1 2 3")
        load_vectors(tmp_path / "v.txt")


@pytest.mark.slow
def test_explain_text_on_the_embedded_model(embedded_run):
    n_new = SETTINGS["evaluate"]["max_new_tokens"]
    records = explain(
        ["The Eiffel Tower is in", "Cats sleep"],
        None,
        embedded_run["av"],
        embedded_run["ar"],
        max_new_tokens=n_new,
        device="cpu",
    )
    assert [r.text for r in records] == ["The Eiffel Tower is in", "Cats sleep"]
    assert records[0].token.strip() == "in" and records[1].token.strip() == "sleep"
    assert all(isinstance(r.explanation, str) and r.fve is not None and -1 <= r.cos <= 1 for r in records)
    assert all(r.fve == pytest.approx(1 - (2 - 2 * r.cos) / _denominator(embedded_run), abs=1e-4) for r in records)

    every = explain("The Eiffel Tower is in", "all", embedded_run["av"], max_new_tokens=4, device="cpu")
    assert [r.position for r in every] == list(range(len(every))) and len(every) >= 5
    assert all(r.fve is None for r in every)  # no AR given
    assert every[-1].token.strip() == "in"  # 'all' ends at the default (last) position
    assert "FVE" in format_records(records) and "'" in format_records(every)


@pytest.mark.slow
def test_explain_vectors_matches_the_activations_table(embedded_run, tmp_path):
    from nla.data import load_rows, vectors_of

    rows = load_rows(embedded_run["act"], embedded_run["split"], ["eval"]).head(2)
    np.save(tmp_path / "v.npy", vectors_of(rows))
    records = explain_vectors(
        tmp_path / "v.npy", embedded_run["av"], embedded_run["ar"], max_new_tokens=4, device="cpu"
    )
    assert len(records) == 2 and all(r.position is None and r.fve is not None for r in records)
    with pytest.raises(NLAError, match="shape"):
        np.save(tmp_path / "bad.npy", np.zeros((2, 7), dtype=np.float32))
        explain_vectors(tmp_path / "bad.npy", embedded_run["av"], device="cpu")


def _denominator(run) -> float:
    import yaml

    return yaml.safe_load((run["ar"] / "nla_meta.yaml").read_text())["fve_denominator"]
