"""The public Python API (`from nla import NLA`) on the embedded model, as the README shows it."""

from __future__ import annotations

import pytest
import torch
from embedded_pipeline import shared_run

from nla.errors import NLAError


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    return shared_run(tmp_path_factory)


def test_the_readme_example_runs_and_is_consistent(embedded_run):
    from nla import NLA  # the lazy top-level name

    nla = NLA.load(av=embedded_run["av"], ar=embedded_run["ar"])
    v = nla.activations(["The Eiffel Tower is in"], positions=[-1])  # (n, d) at the sidecar's layer
    texts = nla.verbalize(v)  # list[str], greedy by default
    v_hat = nla.reconstruct(texts)  # (n, d)
    fve = nla.fve(v, v_hat)

    d = nla.av.meta["d_model"]
    assert v.shape == (1, d) and v_hat.shape == (1, d) and fve.shape == (1,)
    assert isinstance(texts, list) and isinstance(texts[0], str)
    assert torch.isfinite(fve).all()
    # The vector is the subject model's block-K output at the last token, read independently.
    from nla.models import load_model, residual_at
    from nla.sidecar import base_model_config

    model, tokenizer, _ = load_model(base_model_config(nla.av.meta))
    ids = tokenizer("The Eiffel Tower is in", return_tensors="pt").input_ids
    torch.testing.assert_close(v, residual_at(model, nla.layer, ids)[:, -1].float())
    # Greedy: the same vector gives the same text again.
    assert nla.verbalize(v) == texts


def test_api_refuses_reconstruct_without_an_ar(embedded_run):
    from nla import NLA

    nla = NLA.load(av=embedded_run["av"])
    with pytest.raises(NLAError, match="no AR"):
        nla.reconstruct(["some text"])
