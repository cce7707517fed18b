"""`nla plan`: the memory plan from a config alone, checked against real models and a measured step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_ar import tiny_tokenizer

from nla.cli import main
from nla.config import NLAConfig
from nla.errors import NLAError
from nla.plan import format_plan, measure_ar_step, plan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_plan")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_cfg(folder, **sections) -> NLAConfig:
    base = {
        "model": {"name": str(folder), "layer": 2, "dtype": "float32", "device": "cpu"},
        "av_sft": {"batch_size": 4, "max_length": 32, "lora": {"r": 4, "alpha": 8}},
        "ar_sft": {"batch_size": 4, "max_explanation_tokens": 24, "lora": {"r": 4, "alpha": 8}},
    }
    return NLAConfig.model_validate({**base, **sections})


def test_plan_counts_the_models_real_parameters(tiny_dir):
    from peft import LoraConfig, get_peft_model

    needs = {(n.stage, n.setting): n for n in plan(tiny_cfg(tiny_dir), gpus=2)}
    real = tiny_model("llama")
    assert needs["extract", "each GPU"].weights == sum(p.numel() * 4 for p in real.parameters())
    lora = get_peft_model(real, LoraConfig(r=4, lora_alpha=8, target_modules=NLAConfig().av_sft.lora.target_modules))
    trainable = sum(p.numel() * 4 for p in lora.parameters() if p.requires_grad)
    one, ddp, fsdp = (needs["av_sft", s] for s in ("1 GPU", "DDP ×2", "FSDP ×2"))
    assert one.grads == ddp.grads == trainable and one.optimizer == 2 * trainable  # AdamW: two moments
    assert fsdp.grads == trainable / 2 and fsdp.optimizer == one.optimizer / 2  # sharded two ways
    assert ddp.activations == pytest.approx(one.activations / 2)  # half the global batch per GPU
    rl = needs["rl", "1 GPU"]
    assert rl.weights > 2 * one.weights  # AV + reference adapter + merged sampling copy + AR
    assert "| av_sft | FSDP ×2 |" in format_plan(list(needs.values()), "tiny")


def test_planned_activations_match_a_measured_ar_step(tiny_dir):
    result = measure_ar_step(tiny_cfg(tiny_dir))
    assert result["measured_saved_bytes"] > 0
    # The same tensors, counted on meta (plan) and on the CPU (measured); meta's attention path differs a little.
    assert result["estimated_activation_bytes"] == pytest.approx(result["measured_saved_bytes"], rel=0.15)


def test_plan_command_prints_the_table_and_refuses_bad_input(tiny_dir, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"model: {{name: '{tiny_dir}', layer: 2}}\n")
    assert main(["--params", str(params), "plan", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "| rl | FSDP ×4 |" in out and "fits 141 GB" in out
    assert main(["--params", str(params), "plan", "--gpus", "0"]) == 2
    assert "plan for at least 1 GPU" in capsys.readouterr().err
    with pytest.raises(NLAError, match="no config for model.name"):
        plan(NLAConfig.model_validate({"model": {"name": "someone/unknown-model"}}), root=tmp_path)


@pytest.mark.parametrize(
    "name, parameters, layers", [("qwen3-8b", 8_190_735_360, 36), ("llama-3.3-70b-instruct", 70_553_706_496, 80)]
)
def test_shipped_configs_build_the_published_models(name, parameters, layers):
    """profiles/configs/*.json on meta: the published parameter counts (Qwen3-8B 8.19 B, Llama-3.3-70B 70.6 B)."""
    from nla.plan import CONFIG_DIR, meta_model, model_config

    config = model_config(NLAConfig(), path=REPO / CONFIG_DIR / f"{name}.json")
    assert config.num_hidden_layers == layers and not config.tie_word_embeddings
    assert sum(p.numel() for p in meta_model(config, torch.bfloat16).parameters()) == parameters
