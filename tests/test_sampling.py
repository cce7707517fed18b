"""The fast sampler: same tokens as `model.generate` under greedy decoding, with injection and left padding.

Every comparison runs on the CPU; where CUDA is present the same tests also run on it in
float32, which exercises the CUDA-graph decode path against `generate`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_model

from nla.errors import NLAError
from nla.injection import ActivationInjector, Marker
from nla.sampling import Decoder, sample, sample_with_generate, stop_lengths

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MARKER = Marker("m", token_id=7, left_id=5, right_id=9)  # tiny models: any ids will do
PAD = 0


def left_padded_prompts(n: int = 3, width: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of different lengths, left-padded, each holding one anchored marker site."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 500, (n, width), generator=g)
    mask = torch.ones_like(ids)
    for r in range(n):
        pad = (2 * r) % (width - 5)
        mask[r, :pad] = 0
        ids[r, :pad] = PAD
        ids[r, pad + 1 : pad + 4] = torch.tensor([MARKER.left_id, MARKER.token_id, MARKER.right_id])
    return ids, mask


def on(device: str, model: torch.nn.Module) -> torch.nn.Module:
    model.config.pad_token_id = PAD
    return model.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["replace", "karvonen"])
def test_greedy_matches_generate_with_injection_and_left_padding(tiny_arch_model, mode, device):
    arch, model = tiny_arch_model
    model = on(device, model)
    ids, mask = left_padded_prompts()
    injector = ActivationInjector(model, MARKER, mode, scale=4.0)
    with injector.bound(torch.randn(3, TINY["hidden_size"], generator=torch.Generator().manual_seed(2)) * 10):
        ours = sample(model, ids, mask, max_new_tokens=10)
        assert injector.n_injections == 1  # the prefill only: decode steps hold no marker sites
        reference = sample_with_generate(model, ids, mask, max_new_tokens=10)
    assert ours.device.type == device
    assert torch.equal(ours.cpu(), reference.cpu()), f"{arch}/{mode}: sampler and generate disagree"

    with injector.detached():  # the same model without injection
        assert not torch.equal(sample(model, ids, mask, max_new_tokens=10).cpu(), ours.cpu())  # injection mattered
    injector.remove()


@pytest.mark.parametrize("device", DEVICES)
def test_sliding_window_layers_match_generate(device):
    """Gemma-3 with a window shorter than the prompt: the sliding masks must follow the window exactly."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(**{**TINY, "num_hidden_layers": 6}, head_dim=16, sliding_window=5)
    assert "full_attention" in config.layer_types and "sliding_attention" in config.layer_types
    model = on(device, AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    ids, mask = left_padded_prompts()
    assert torch.equal(sample(model, ids, mask, 12).cpu(), sample_with_generate(model, ids, mask, 12).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_rows_stop_on_stop_ids_and_sequences_like_generate(device):
    model = on(device, tiny_model("llama"))
    ids, mask = left_padded_prompts(n=4)
    free = sample(model, ids, mask, 12).cpu()
    stop_id = int(free[0, 3])  # a token row 0 emits: it must stop there
    sequence = free[1, 4:6].tolist()  # two tokens row 1 emits: it must stop after them

    ours = sample(model, ids, mask, 12, stop_ids={stop_id}, stop_sequences=[sequence]).cpu()
    reference = sample_with_generate(model, ids, mask, 12, stop_ids={stop_id}, stop_sequences=[sequence]).cpu()
    assert torch.equal(ours, reference)

    lengths, stopped = stop_lengths(ours, {stop_id}, [sequence])
    for r in range(4):  # each row equals the free continuation cut at its stop, then padding
        n = int(lengths[r])
        assert torch.equal(ours[r, :n], free[r, :n])
        assert (ours[r, n:] == PAD).all()
    assert stopped[0] and stopped[1] and int(lengths[0]) <= 4 and int(lengths[1]) <= 6


def test_all_rows_stopping_early_shortens_the_output():
    model = on("cpu", tiny_model("llama"))
    ids, mask = left_padded_prompts(n=2)
    free = sample(model, ids, mask, 20)
    stops = {int(free[0, 1]), int(free[1, 1])}
    out = sample(model, ids, mask, 20, stop_ids=stops, check_every=1)
    assert out.shape[1] <= 2 and torch.equal(out, sample_with_generate(model, ids, mask, 20, stop_ids=stops))


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_sampling_is_reproducible_with_a_generator(device):
    model = on(device, tiny_model("llama"))
    ids, mask = left_padded_prompts()

    def draw(seed: int, temperature: float = 1.0) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(seed)
        return sample(model, ids, mask, 16, temperature=temperature, generator=generator).cpu()

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(3, temperature=1e-4), sample(model, ids, mask, 16).cpu())  # T → 0 is greedy


def test_training_mode_is_restored_and_bad_inputs_are_clear_errors():
    model = on("cpu", tiny_model("llama")).train()
    ids, mask = left_padded_prompts()
    sample(model, ids, mask, 3)
    assert model.training
    right_padded = mask.flip(1)
    with pytest.raises(NLAError, match="left-padded"):
        sample(model, ids, right_padded, 3)
    with pytest.raises(NLAError, match="cuda_graph=True needs"):
        sample(model.cpu(), ids, mask, 3, cuda_graph=True)
    with pytest.raises(NLAError, match="max_new_tokens must be"):
        sample(model, ids, mask, 0)


def test_lora_model_matches_generate():
    """The AV is a PEFT LoRA model: the sampler must drive it through the wrapper like generate does."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(on("cpu", tiny_model("llama")), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter, not the zero init
    ids, mask = left_padded_prompts()
    injector = ActivationInjector(model, MARKER, "replace", scale=4.0)
    injector.bind(torch.randn(3, TINY["hidden_size"]))
    assert torch.equal(sample(model, ids, mask, 8), sample_with_generate(model, ids, mask, 8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decoder_reused_across_calls_equals_fresh_sampling(arch, device):
    """A Decoder keeps buffers (and on CUDA the graph) per shape: later calls, with other vectors,
    other padding, another shape and weights changed in place, must equal a fresh `sample` each time."""
    model = on(device, tiny_model(arch))
    injector = ActivationInjector(model, MARKER, "replace", scale=4.0)
    decoder = Decoder(model)
    g = torch.Generator().manual_seed(3)
    for seed, rows, new in [(1, 3, 10), (2, 3, 10), (3, 5, 6), (4, 3, 10)]:
        ids, mask = left_padded_prompts(n=rows, seed=seed)
        injector.bind(torch.randn(rows, TINY["hidden_size"], generator=g) * 10)
        reused = decoder.sample(ids, mask, new)
        assert torch.equal(reused, sample(model, ids, mask, new)), f"{arch}: call with seed {seed}"
        with torch.no_grad():  # an optimizer-like in-place update before the next call
            for p in model.parameters():
                p.mul_(1.05)
    assert len(decoder._steps) == 2  # (3, 12, 10) and (5, 12, 6): the third 3-row call reused the first
    injector.remove()


@pytest.mark.slow
def test_embedded_av_greedy_matches_generate(embedded):
    """The real AV prompt, marker, eos and closing tag on the embedded model, rows of different lengths."""
    from nla.av import attach_injector, av_marker, av_prompt
    from nla.config import NLAConfig

    model, tokenizer, _ = embedded
    cfg = NLAConfig()
    marker = av_marker(tokenizer, cfg.prompts, cfg.injection)
    short = cfg.prompts
    long = short.model_copy(update={"av_user": "Read this carefully. " + short.av_user})
    texts = [av_prompt(tokenizer, p, marker.char) for p in (short, long, short, long)]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (batch["attention_mask"] == 0).any()  # left padding is really exercised
    injector = attach_injector(model, marker, cfg.injection, scale=40.0)
    try:
        injector.bind(torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(0)))
        stop_ids = {tokenizer.eos_token_id}
        close = [tokenizer(cfg.prompts.av_answer_close, add_special_tokens=False)["input_ids"]]
        args = (model, batch["input_ids"], batch["attention_mask"], 12)
        ours = sample(*args, stop_ids=stop_ids, stop_sequences=close)
        reference = sample_with_generate(*args, stop_ids=stop_ids, stop_sequences=close)
        assert injector.n_injections == 2  # one prefill each
    finally:
        injector.remove()
    assert torch.equal(ours, reference)
    assert ours.shape[0] == 4 and ours.shape[1] >= 1
