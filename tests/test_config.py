"""Params loading: defaults validate, typos and wrong types fail with one clear line."""

from __future__ import annotations

import pytest
import yaml

from nla.config import NLAConfig, load_config
from nla.errors import NLAError


def write(tmp_path, data) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_repo_params_file_matches_the_typed_defaults():
    cfg = load_config("params.yaml")
    assert cfg.model.layer == 20
    with open("params.yaml") as fh:
        assert cfg == NLAConfig.model_validate(yaml.safe_load(fh))


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(NLAError, match=r"unknown key 'extract.positons_per_doc'"):
        load_config(write(tmp_path, {"extract": {"positons_per_doc": 3}}))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(NLAError, match=r"invalid value for 'model.layer'"):
        load_config(write(tmp_path, {"model": {"layer": "twenty"}}))


def test_split_fractions_must_sum_to_one(tmp_path):
    bad = {"split": {"fractions": {"av_sft": 0.5, "ar_sft": 0.5, "rl": 0.5, "eval": 0.5}}}
    with pytest.raises(NLAError, match="sum to 1"):
        load_config(write(tmp_path, bad))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(NLAError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(NLAError, match="not valid YAML"):
        load_config(bad)


def test_profile_overlay(tmp_path):
    params = write(tmp_path, {"model": {"layer": 5}})
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "deep.yaml").write_text(yaml.safe_dump({"model": {"layer": 7}}))
    assert load_config(params, "deep").model.layer == 7
    with pytest.raises(NLAError, match="profile 'nope' not found"):
        load_config(params, "nope")
