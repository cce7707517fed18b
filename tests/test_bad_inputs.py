"""Bad input, second round: the cases a demanding new user found, each one line and exit 2, or a stated warning.

Same contract as `tests/test_reliability.py` (whose helpers these tests use): the real `nla`
CLI in a fresh project folder, exit code 2, exactly one `nla <command>: error:` line naming the
problem and the fix, no traceback, nothing written. Where refusing would be wrong (a text
longer than the window, documents cut by extract) the output says what was done instead.
Every case has its row in docs/bad_inputs.md.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from test_reliability import (
    NLA,
    copy_project,
    make_project,
    nla,
    no_temp_files,
    refused,
    retune,
    snapshot,
    write_corpus,
)

from nla.errors import NLAError
from nla.io import write_table
from nla.models import residual_at

# ----------------------------------------------------------------------------- params


def test_empty_or_comment_only_params_are_refused_unless_defaults_is_given(tmp_path):
    for text in ("", "# every setting at its default?\n\n# (no)\n"):
        project = make_project(tmp_path / str(len(text)), text=text)
        refused(
            nla(project, "corpus"),
            "corpus",
            r"params\.yaml has no settings \(empty or only comments\); write the sections to change, or pass --defaults",
        )
        assert snapshot(project) == {}
    result = nla(project, "--defaults", "corpus")
    assert result.returncode == 0, result.stderr[-2000:]
    docs = pd.read_parquet(project / "data/corpus/documents.parquet")
    assert (~docs.foreign).sum() == 300 and docs.foreign.sum() > 0  # the default corpus and its foreign set


UTF16_CASES = [
    ("UTF-16 with a BOM", "utf-16", r"params\.yaml is UTF-16, not UTF-8; save it as UTF-8 \(e\.g\. `iconv -f UTF-16"),
    ("UTF-16 without a BOM", "utf-16-le", r"params\.yaml is UTF-16, not UTF-8"),
    ("UTF-32", "utf-32", r"params\.yaml is UTF-32, not UTF-8"),
    ("Latin-1", "latin-1", r"params\.yaml is not UTF-8 \(byte 39\); save it as UTF-8"),
]


@pytest.mark.parametrize("case", UTF16_CASES, ids=[c[0] for c in UTF16_CASES])
def test_a_params_file_in_another_unicode_encoding_says_which(tmp_path, case):
    _, encoding, pattern = case
    make_project(tmp_path)
    (tmp_path / "params.yaml").write_bytes("corpus:\n  max_docs: 4\n  text_field: caf\u00e9\n".encode(encoding))
    refused(nla(tmp_path, "corpus"), "corpus", pattern)
    (tmp_path / "params.yaml").write_bytes(codecs.BOM_UTF8 + b"corpus:\n  max_docs: 4\n")  # a UTF-8 BOM is fine
    assert nla(tmp_path, "corpus").returncode == 0


# ----------------------------------------------------------------------------- corpus


def test_a_directory_as_corpus_source_says_it_is_one(tmp_path):
    project = make_project(tmp_path / "p")
    (project / "empty").mkdir()
    make_project(project, {"corpus": {"source": str(project / "empty")}})
    refused(nla(project, "corpus"), "corpus", r"corpus\.source .*/empty is an empty directory; point it to one \.txt")
    write_corpus(project / "empty", "a.txt", b"text")
    refused(nla(project, "corpus"), "corpus", r"corpus\.source .*/empty is a directory; point it to one")
    assert not (project / "data").exists()


def test_a_corrupt_user_parquet_is_named_as_the_users_input(tmp_path):
    project = make_project(tmp_path)
    source = write_corpus(project, "mine.parquet", b"PAR1 cut short")
    make_project(project, {"corpus": {"source": source}})
    line = refused(nla(project, "corpus"), "corpus", r"mine\.parquet is not a readable table \(.*\); it is the corpus")
    assert "corpus.source file: repair or re-export it" in line and "rerun the stage" not in line


def test_a_hub_corpus_while_offline_is_one_line(tmp_path):
    project = make_project(tmp_path, {"corpus": {"source": "hf:nla-test/no-such-dataset"}})
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [NLA, "--params", "params.yaml", "corpus"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    refused(
        result,
        "corpus",
        r"corpus\.source hf:nla-test/no-such-dataset is not in the local datasets cache and HF_HUB_OFFLINE is set",
    )
    assert snapshot(project) == {}


# ----------------------------------------------------------------------------- model folders and windows


def test_a_model_folder_of_an_unknown_model_type_is_one_line(tmp_path):
    project = make_project(tmp_path / "p")
    model = tmp_path / "exotic"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llamazz", "hidden_size": 32}))
    write_table(
        project / "data/corpus/documents.parquet",
        pd.DataFrame({"doc_id": ["doc-0"], "text": ["A short document about rivers. " * 8], "source": "test"}),
    )
    make_project(project, {"model": {"name": str(model)}})
    refused(
        nla(project, "extract"),
        "extract",
        r"exotic/config\.json names model_type 'llamazz', which transformers [\d.]+ does not know; check model\.name",
    )
    assert not (project / "data/activations").exists()


@pytest.mark.slow
def test_an_extract_window_longer_than_the_models_context_is_refused(tmp_path, data_project):
    project = retune(copy_project(data_project, tmp_path / "p"), {"extract": {"max_tokens": 512}})
    before = snapshot(project)
    refused(
        nla(project, "extract"),
        "extract",
        r"extract\.max_tokens=512 is longer than the model's context of 256 tokens; set extract\.max_tokens to at most 256",
    )
    assert snapshot(project) == before


@pytest.mark.slow
def test_extract_says_how_many_documents_its_window_cuts(tmp_path, data_project, caplog):
    from nla.config import load_config
    from nla.extract import run_extract

    project = copy_project(data_project, tmp_path / "p")
    cfg = load_config(project / "params.yaml")
    docs = pd.DataFrame({"doc_id": ["a", "b"], "text": ["river " * 20, "river " * 300], "source": "test"})
    write_table(project / "docs.parquet", docs)
    with caplog.at_level(logging.WARNING, logger="nla.extract"):
        run_extract(cfg, project / "docs.parquet", project / "act", project / "work")
    assert re.search(
        r"1 of 2 documents are longer than extract\.max_tokens=48 and are read through their first 48 tokens "
        r"\(the longest has 30\d\); raise extract\.max_tokens",
        caplog.text,
    )


def test_split_refuses_a_split_without_a_share(tmp_path):
    project = make_project(tmp_path, {"split": {"fractions": {"av_sft": 0.5, "ar_sft": 0.3, "rl": 0.2, "eval": 0.0}}})
    table = pd.DataFrame({"row_id": [f"d{i}:3" for i in range(8)], "doc_id": [f"d{i}" for i in range(8)]})
    write_table(project / "data/activations/activations.parquet", table)
    refused(
        nla(project, "split"),
        "split",
        r"split\.fractions gives \['eval'\] a share of 0, but the eval stage needs documents; give every split a positive",
    )
    assert not (project / "data/split").exists()
    from nla.config import NLAConfig
    from nla.extract import run_split

    cfg = NLAConfig()
    cfg.split.fractions = {"av_sft": 0.5, "ar_sft": 0.3, "rl": 0.0, "eval": 0.2}
    with pytest.raises(NLAError, match=r"gives \['rl'\] a share of 0"):
        run_split(cfg, project / "data/activations", project / "split")


def test_split_warns_about_a_split_that_got_no_document(tmp_path, caplog):
    from nla.config import NLAConfig
    from nla.extract import run_split
    from nla.sidecar import make_meta, write_sidecar

    table = pd.DataFrame({"row_id": [f"d{i}:3" for i in range(4)], "doc_id": [f"d{i}" for i in range(4)]})
    write_table(tmp_path / "act/activations.parquet", table)
    write_sidecar(tmp_path / "act", make_meta("nla_dataset", "extract", base_model="m", d_model=8, layer=0, rows=4))
    with caplog.at_level(logging.WARNING, logger="nla.extract"):
        split = run_split(NLAConfig(), tmp_path / "act", tmp_path / "split")  # 0.45/0.25/0.15/0.15 of 4 documents
    assert "rl" not in set(split.split)
    assert (
        "splits ['rl'] got no document of 4 (too few documents for split.fractions); raise corpus.max_docs"
        in caplog.text
    )


# ----------------------------------------------------------------------------- explain


def test_explain_refuses_an_empty_text_before_loading_anything(tmp_path):
    """No checkpoint exists here: the refusal comes before any model would load."""
    refused(nla(make_project(tmp_path), "explain", ""), "explain", r"^nla explain: error: text 0 is empty; pass some")
    from nla.api import check_texts

    with pytest.raises(NLAError, match=r"^text 1 is empty"):
        check_texts(["fine", ""])
    with pytest.raises(NLAError, match=r"^text 0 is a bytes, not a string; pass texts as str"):
        check_texts([b"fine"])


def test_explain_refuses_nan_vectors_before_loading_anything(tmp_path):
    vectors = np.ones((4, 32), dtype=np.float32)
    vectors[2, 5] = np.nan
    np.save(tmp_path / "v.npy", vectors)
    refused(
        nla(make_project(tmp_path), "explain", "--vectors", "v.npy"),
        "explain",
        r"v\.npy: vectors hold NaN or Inf in rows \[2\]; check where they came from",
    )


@pytest.mark.slow
def test_nan_vectors_through_the_python_api_are_refused_by_the_injector(sft_project):
    from nla.api import NLA as Api

    nla_ = Api.load(sft_project / "data/checkpoints/av_sft")
    vectors = torch.ones(3, 32)
    vectors[1, 0] = float("inf")
    with pytest.raises(NLAError, match=r"vectors hold NaN or Inf in rows \[1\]"):
        nla_.verbalize(vectors, max_new_tokens=2)


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_a_truncated_adapter_is_one_line_in_explain_and_evaluate_before_any_work(tmp_path, sft_project):
    project = copy_project(sft_project, tmp_path / "p")
    checkpoints = project / "data/checkpoints"
    adapter = checkpoints / "av_sft/adapter_model.safetensors"
    size = adapter.stat().st_size
    truncate(adapter)
    pattern = rf"av_sft/adapter_model\.safetensors is truncated or corrupt \({size // 2} bytes where its header promises {size}\); copy the checkpoint again"
    refused(nla(project, "explain", "The river rose"), "explain", pattern)

    # evaluate: an RL pair whose AV is cut short is found before any data is read or model loaded
    (checkpoints / "rl").mkdir()
    subprocess.run(["cp", "-a", str(checkpoints / "av_sft"), str(checkpoints / "rl/av")], check=True)
    subprocess.run(["cp", "-a", str(checkpoints / "ar_sft"), str(checkpoints / "rl/ar")], check=True)
    adapter.write_bytes((sft_project / "data/checkpoints/av_sft/adapter_model.safetensors").read_bytes())  # whole
    (project / "data/activations/activations.parquet").unlink()  # reading data first would fail on this instead
    before = snapshot(project)
    refused(nla(project, "evaluate"), "evaluate", pattern.replace("av_sft/", "rl/av/"))
    assert snapshot(project) == before
    no_temp_files(project)


@pytest.mark.slow
def test_a_text_longer_than_the_window_is_explained_at_its_last_token_with_a_warning(tmp_path, sft_project):
    """The tiny model's context is 256 tokens: a 10,000-token text is read through its last 256."""
    text = "the river rose near the old mill and " * 1250
    result = nla(sft_project, "explain", "--json", text)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    from nla.api import NLA as Api

    nla_ = Api.load(sft_project / "data/checkpoints/av_sft")
    n_tokens = len(nla_.subject()[1](text)["input_ids"])
    assert n_tokens > 10_000 and record["position"] == n_tokens - 1  # the token asked for, not token 255
    assert (
        "1 of 1 texts are longer than the 256-token window (max_tokens, at most the model's context); each was read "
        "through the 256 tokens ending at its last explained position, e.g. text 0" in result.stderr
    )
    long_read, _ = nla_.read([text])
    model, tokenizer = nla_.subject()
    window = torch.tensor([tokenizer(text)["input_ids"][-256:]])  # (1, 256); this tokenizer adds no BOS
    direct = residual_at(model, nla_.layer, window, torch.ones_like(window))[0, -1]
    torch.testing.assert_close(long_read[0], direct.float(), rtol=1e-5, atol=1e-5)  # exactly those 256 tokens
    with pytest.raises(NLAError, match=r"position 0 of text 0 is outside its 256-token window \(positions \d+\.\.\d+"):
        nla_.read([text], [0, -1])
