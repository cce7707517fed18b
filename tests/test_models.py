"""Named access points into the model: blocks, embeddings, the residual stream at block K."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from nla.config import ModelConfig
from nla.errors import NLAError
from nla.models import check_layer, decoder_blocks, embedding_multiplier, load_model, residual_at, resolve_source


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_residual_at_equals_hidden_states(tiny_arch_model, layer):
    # (HF applies the final norm to the last entry of hidden_states, so the last block is excluded.)
    arch, model = tiny_arch_model
    ids = torch.randint(0, 512, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    captured = residual_at(model, layer, ids, mask)
    full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    torch.testing.assert_close(captured, full)


def test_residual_at_does_not_run_later_blocks():
    model = tiny_model("llama")
    calls = []
    handles = [
        b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(decoder_blocks(model))
    ]
    residual_at(model, 1, torch.randint(0, 512, (1, 5)))
    for h in handles:
        h.remove()
    assert calls == [0, 1]


def test_gemma_embedding_scale_is_visible():
    assert embedding_multiplier(tiny_model("gemma3")) == pytest.approx(64**0.5)
    assert embedding_multiplier(tiny_model("llama")) == 1.0


def test_unmappable_architecture_is_a_clear_error():
    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "odd"})()

    with pytest.raises(NLAError, match="cannot locate the decoder blocks of architecture 'odd'"):
        decoder_blocks(Odd())


def test_layer_out_of_range():
    with pytest.raises(NLAError, match=r"layer 4 is out of range .* 0\.\.3"):
        check_layer(tiny_model("llama"), 4)


def test_missing_local_sources_fail_clearly(tmp_path):
    with pytest.raises(NLAError, match="not found"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(NLAError, match="not found"):
        resolve_source("./no/such/dir")


def test_local_directory_source(tmp_path):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "qwen")
    source = resolve_source(str(tmp_path / "qwen"))
    assert source.gguf_file is None and source.fingerprint.startswith("dir:")


@pytest.mark.slow
def test_embedded_model_loads_from_cached_safetensors(embedded):
    model, tokenizer, source = embedded
    assert source.fingerprint.startswith("gguf:SmolLM2-135M-Instruct")
    assert len(decoder_blocks(model)) == 30 and model.config.hidden_size == 576
    assert tokenizer.pad_token is not None
    again, _, _ = load_model(ModelConfig())
    ids = tokenizer("The Eiffel Tower is in", return_tensors="pt").input_ids
    torch.testing.assert_close(model(ids).logits, again(ids).logits)
