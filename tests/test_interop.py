"""Public NLA checkpoints (nla.interop) on tiny random Qwen3, Gemma-3 and Llama models.

Each fixture is a folder as the public code writes it: the model's weights, a tokenizer with a
chat template, a generation config with two end-of-sequence ids, and a sidecar in one of the
public formats with a custom prompt template. The reference computations are written here,
independently of nla: the prompt rendered with `apply_chat_template(tokenize=True)`, the vector
written by a hand-made forward hook, greedy decoding by full forwards without a KV cache (so the
Karvonen hook runs on every forward, as nanoNLA's does), and the AR as the reference clients
compute it (HF hidden states, or PEFT's own LoRA layers). No Hub: one test resolves a Hub id
from a local Hugging Face cache with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model
from safetensors.torch import save_file

from nla.av import parse_completion
from nla.config import PromptConfig
from nla.errors import NLAError
from nla.interop import (
    EMBEDDED_KEY,
    choose_injection,
    convert,
    load_any_ar,
    load_any_av,
    read_meta,
    read_raw_sidecar,
    resolve_checkpoint,
    translate,
)

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("qwen3", "gemma3", "llama")
FORMATS = ("nla_dataset", "actor", "release")  # dataset sidecar v1; model sidecar v2 in training / release naming
MARKER = "㈎"
AV_TEMPLATE = "Layer-2 state of a model: <concept>{injection_char}</concept>. Describe it in a sentence."
AR_TEMPLATE = "Summary of the state: {explanation} <state>"
LAYER, D, SCALE, NEW = 2, 64, 30.0, 10
MERGED = {"atol": 1e-4, "rtol": 1e-3}  # float32 rounding of merged LoRA weights and of batching
TEXTS = ["The Eiffel Tower is in Paris.", "A news report about a football match and the weather in the city."]
# Per architecture: special tokens (eos first), chat template, whether the tokenizer adds a BOS.
CHAT = {
    "qwen3": (
        ["<|im_end|>", "<|endoftext|>", "<|im_start|>"],
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        False,
    ),
    "gemma3": (
        ["<eos>", "<end_of_turn>", "<bos>", "<start_of_turn>"],
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
        "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        True,
    ),
    "llama": (
        ["<|eot_id|>", "<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
        "<|end_header_id|>\n\n{% endif %}",
        True,
    ),
}
CORPUS = [
    "The Eiffel Tower is in Paris. A news report about a football match and the weather in the city.",
    "Layer-2 state of a model: <concept>x</concept>. Describe it in a sentence. Summary of the state: <state>",
    "<explanation>\nThe text is about a place; the next word is likely a name.\n</explanation>",
] * 20


def make_tokenizer(arch: str):
    """A small byte-level BPE tokenizer (< 512 ids, the tiny models' vocabulary) with `arch`'s chat conventions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, template, bos = CHAT[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{specials[2]} $A", special_tokens=[(specials[2], tok.token_to_id(specials[2]))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=specials[0], pad_token=specials[1], bos_token=specials[2] if bos else None
    )
    fast.add_tokens([MARKER])  # one ordinary (non-special) token, as the marker is in the real vocabularies
    fast.chat_template = template
    return fast


def sharpened(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with peaked attention (large q/k projections, q/k norm gains of 4), so that what is
    written at one prompt position shows in the greedy tokens; at the default init it often does not."""
    g = torch.Generator().manual_seed(seed)
    gemma = "gemma" in model.config.model_type  # Gemma's norms scale by (1 + weight)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.copy_(
                    torch.randn(param.shape, generator=g)
                    * (0.3 if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.05)
                )
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.fill_(3.0 if gemma else 4.0)
    return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """arch -> a folder with a tiny model, its tokenizer and a generation config listing two EOS ids."""
    from transformers import GenerationConfig

    root = tmp_path_factory.mktemp("bases")
    out = {}
    for arch in ARCHS:
        tokenizer, model = make_tokenizer(arch), sharpened(tiny_model(arch))
        assert len(tokenizer) <= model.config.vocab_size
        eos = [tokenizer.convert_tokens_to_ids(t) for t in CHAT[arch][0][:2]]
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


# ----------------------------------------------------------------------------- the reference, by hand


def reference_prompt(tokenizer, template: str, char: str) -> list[int]:
    content = template.format(injection_char=char)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def neighbours(folder: Path, template: str = AV_TEMPLATE) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    (token_id,) = tokenizer.encode(MARKER, add_special_tokens=False)
    ids = reference_prompt(tokenizer, template, MARKER)
    p = ids.index(token_id)
    return {
        "injection_char": MARKER,
        "injection_token_id": token_id,
        "injection_left_neighbor_id": ids[p - 1],
        "injection_right_neighbor_id": ids[p + 1],
        "critic_suffix_ids": None,
    }


def reference_tokens(folder: Path, vector: torch.Tensor, mode: str, scale: float | None, n_new: int = NEW) -> list[int]:
    """Greedy tokens of the AV in `folder` with `vector` injected by hand, as the reference clients do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    raw = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    templates = raw["prompt_templates"]
    ids = reference_prompt(tokenizer, templates.get("av") or templates["actor"], MARKER)
    p = ids.index(raw["tokens"]["injection_token_id"])
    eos = set(model.generation_config.eos_token_id)

    def replace(module, args, output):  # the embedding output at p becomes s * v / |v|
        out = output.clone()
        out[0, p] = vector / (vector.norm() / scale)
        return out

    def karvonen(module, args, output):  # h_p <- h_p + |h_p| v/|v| on every forward of length >= 2
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] < 2:
            return None
        hidden = hidden.clone()
        h = hidden[0, p].clone()
        hidden[0, p] = h + h.norm() * vector / vector.norm()
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    if mode == "replace":
        handle = model.model.embed_tokens.register_forward_hook(replace)
    else:
        handle = model.model.layers[1].register_forward_hook(karvonen)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n_new):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(token)
            if token in eos:
                break
    handle.remove()
    return seq[len(ids) :]


# ----------------------------------------------------------------------------- public fixtures


def public_sidecar(fmt: str, role: str, base: str, tokens: dict | None, injection_scale, mse_scale="sqrt_d_model"):
    """A sidecar as the public code writes it: nanoNLA's dataset sidecar, or a model sidecar v2."""
    if fmt == "nla_dataset":
        extraction = {"base_model": base, "d_model": D, "layer_index": LAYER, "norm": "none", "corpus": "fineweb"}
        if injection_scale is not None:
            extraction["injection_scale"] = injection_scale
        raw = {
            "kind": "nla_dataset",
            "schema_version": 1,
            "dataset_id": "tiny-nla-l2",
            "stage": "av_sft",
            "row_count": 10,
            "parent_datasets": [],
            "created_at": "2026-06-01T00:00:00+00:00",
            "created_by": "stage3_build",
            "git_commit": "abc123",
            "extraction": extraction,
            "prompt_templates": {"actor": AV_TEMPLATE, "critic": AR_TEMPLATE},
        }
    else:
        release = fmt == "release"
        raw = {
            "kind": "nla_model",
            "schema_version": 2,
            "role": {"av": "av", "ar": "ar"}[role] if release else {"av": "actor", "ar": "critic"}[role],
            "stage": "rl",
            "base_checkpoint": base,
            "d_model": D,
            "trained_on": ["tiny.parquet"],
            "parent_checkpoints": [],
            "created_at": "2026-06-01T00:00:00+00:00",
            "created_by": "train",
            "extraction": {"injection_scale": injection_scale, "mse_scale": mse_scale},
            "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE}
            if release
            else {"actor": AV_TEMPLATE, "critic": AR_TEMPLATE},
            "critic": {"extraction_layer_index": LAYER},
        }
        if release:
            raw["extraction_layer_index"] = LAYER
    if tokens is not None:
        raw["tokens"] = tokens
    return raw


def write_yaml(folder: Path, data: dict) -> None:
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def public_av(base: Path, dest: Path, fmt: str, injection_scale=SCALE, **tokens_override) -> Path:
    shutil.copytree(base, dest)
    tokens = {**neighbours(dest), **tokens_override}
    write_yaml(dest, public_sidecar(fmt, "av", str(base), tokens, injection_scale))
    return dest


def vectors(n: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 5


def ours(av, vector: torch.Tensor) -> list[int]:
    return list(av.generate(vector[None], NEW)[0].token_ids)


# ----------------------------------------------------------------------------- the AV


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_public_av_tokens_equal_a_hand_written_hook(bases, tmp_path, arch, fmt):
    folder = public_av(bases[arch], tmp_path / "av", fmt)
    v = vectors()
    for mode in ("replace", "karvonen"):  # replace by the sidecar's rule (it has a scale), karvonen by override
        av = load_any_av(folder, "cpu", injection=None if mode == "replace" else "karvonen")
        assert av.meta["injection"]["mode"] == mode and not av.prefill
        got = [ours(av, row) for row in v]
        assert got == [reference_tokens(folder, row, mode, SCALE) for row in v]
        assert len({tuple(t) for t in got}) > 1, f"{mode}: the injected vector does not change the output"


def test_injection_rule_and_override():
    assert choose_injection(150.0, None, "x")["mode"] == "replace"
    karvonen = choose_injection(None, None, "x")
    assert (
        karvonen["mode"] == "karvonen" and karvonen["karvonen_block"] == 1 and "no injection_scale" in karvonen["note"]
    )
    assert "chosen by the caller" in choose_injection(150.0, "karvonen", "x")["note"]
    with pytest.raises(NLAError, match="needs an injection_scale"):
        choose_injection(None, "replace", "x")


@pytest.mark.parametrize("fmt", FORMATS)
def test_sidecar_translation(bases, tmp_path, fmt):
    folder = public_av(bases["qwen3"], tmp_path / "av", fmt, injection_scale=None)
    meta = read_meta(folder)
    assert (meta["role"], meta["d_model"], meta["layer"], meta["base_model"]) == ("av", D, LAYER, str(bases["qwen3"]))
    assert meta["injection"]["mode"] == "karvonen" and meta["weights"] == "full" and meta["av_prefill"] is False
    assert meta["prompts"]["av_user"] == AV_TEMPLATE.replace("{injection_char}", "{marker}")
    assert meta["prompts"]["ar_template"] == AR_TEMPLATE
    assert meta["source_sidecar"] == read_raw_sidecar(folder)
    raw = read_raw_sidecar(folder)
    raw.setdefault("extraction", {})["injection_scale"] = "sqrt_d_model"
    assert translate(raw, folder, "nla_dataset" if fmt == "nla_dataset" else "nla_model")["injection"]["scale"] == 8.0


def test_public_completion_parsing_reads_between_the_tags():
    p = PromptConfig()
    text = "<explanation>\nA news report.\nNext: a name.\n</explanation>"
    assert parse_completion(text, p, prefill=False) == ("A news report.\nNext: a name.", True)
    assert parse_completion("<explanation>\ncut off", p, prefill=False) == ("<explanation>\ncut off", False)
    assert parse_completion("no tags at all ", p, prefill=False) == ("no tags at all", False)


def test_generation_stops_on_every_eos_id_of_the_generation_config(bases, tmp_path):
    folder = public_av(bases["qwen3"], tmp_path / "av", "release")
    v = vectors(1)[0]
    free = reference_tokens(folder, v, "replace", SCALE, n_new=NEW)
    k = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"][0], free[k]]  # a second EOS the model is about to emit
    (folder / "generation_config.json").write_text(json.dumps(config))
    assert ours(load_any_av(folder, "cpu"), v) == free[: k + 1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"injection_token_id": 5}, "encodes the marker"),
        ({"injection_left_neighbor_id": 3}, "neighbours"),
        ({"injection_char": "㈀"}, "encodes the marker"),  # not a single token of this tokenizer
    ],
)
def test_a_tokenizer_that_disagrees_with_the_sidecar_is_refused_in_one_line(bases, tmp_path, change, message):
    folder = public_av(bases["llama"], tmp_path / "av", "nla_dataset", **change)
    with pytest.raises(NLAError, match=message) as err:
        load_any_av(folder, "cpu")
    assert "\n" not in str(err.value)


def test_a_template_with_two_markers_is_refused(bases, tmp_path):
    folder = public_av(bases["gemma3"], tmp_path / "av", "release")
    raw = read_raw_sidecar(folder)
    raw["prompt_templates"]["av"] = AV_TEMPLATE + " Again: <concept>{injection_char}</concept>"
    write_yaml(folder, raw)
    with pytest.raises(NLAError, match="exactly once"):
        load_any_av(folder, "cpu")
    raw["prompt_templates"]["av"] = AV_TEMPLATE + f" Not this one: ({MARKER})"  # the marker char written literally
    write_yaml(folder, raw)
    with pytest.raises(NLAError, match="holds the marker 2 time"):
        load_any_av(folder, "cpu")
    write_yaml(folder, {"kind": "something", "schema_version": 9})
    with pytest.raises(NLAError, match="neither this project's sidecar nor a public NLA one"):
        read_meta(folder)


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_avs_give_identical_tokens_and_round_trips_are_lossless(bases, tmp_path, arch):
    from nla.av import load_av

    public = public_av(bases[arch], tmp_path / "public", "nla_dataset")
    v = vectors(2)
    expected = [ours(load_any_av(public, "cpu"), row) for row in v]
    from nla.cli import main

    assert main(["convert", str(public), str(tmp_path / "ours")]) == 0
    mine = read_meta(tmp_path / "ours")
    assert [ours(load_av(tmp_path / "ours", "cpu"), row) for row in v] == expected  # this project's own loader
    convert(tmp_path / "ours", tmp_path / "kitft", to="kitft")
    released = read_raw_sidecar(tmp_path / "kitft")
    assert released["kind"] == "nla_model" and released["schema_version"] == 2 and released["role"] == "av"
    assert released["tokens"] == read_raw_sidecar(public)["tokens"]
    assert released["prompt_templates"]["av"] == AV_TEMPLATE and released["extraction"]["injection_scale"] == SCALE
    assert [ours(load_any_av(tmp_path / "kitft", "cpu"), row) for row in v] == expected
    back = convert(tmp_path / "kitft", tmp_path / "back")
    assert back == mine and read_meta(tmp_path / "back")["source_sidecar"] == read_raw_sidecar(public)
    stripped = {k: v for k, v in released.items() if k != EMBEDDED_KEY}  # what another client reads
    assert translate(stripped, tmp_path / "kitft", "nla_model")["marker"] == mine["marker"]


# ----------------------------------------------------------------------------- the AR


def truncated_model(base: Path):
    """The base model's blocks 0..K as their own HF model (what the kitft and EasyNLA AR folders hold)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    extra = {"layer_types": config.layer_types[: LAYER + 1]} if getattr(config, "layer_types", None) else {}
    return AutoModelForCausalLM.from_pretrained(base, num_hidden_layers=LAYER + 1, dtype=torch.float32, **extra)


def random_head(seed: int = 3) -> torch.Tensor:
    return torch.eye(D) + 0.1 * torch.randn(D, D, generator=torch.Generator().manual_seed(seed))


def public_ar(base: Path, dest: Path, layout: str) -> tuple[Path, dict]:
    """An AR folder in `layout`, and what the direct computation needs (head, LoRA modules or None, add_special)."""
    from transformers import AutoTokenizer

    dest.mkdir()
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    head = random_head()
    if layout in ("kitft", "easynla"):
        truncated_model(base).save_pretrained(dest)
        save_file({"weight": head}, str(dest / "value_head.safetensors"))
        if layout == "easynla":
            (dest / "ar_meta.json").write_text(json.dumps({"ar_num_layers": LAYER + 1, "final_norm_stripped": True}))
        fmt = "release" if layout == "kitft" else "actor"
        write_yaml(dest, public_sidecar(fmt, "ar", str(base), None, None, mse_scale=8.0))
        return dest, {"head": head, "lora": None, "special": layout == "kitft"}
    # nanoNLA: LoRA injected into the truncated backbone inside a wrapper; the file holds lora_* and value_head.*
    from peft import LoraConfig, inject_adapter_in_model

    wrapper = torch.nn.Module()
    wrapper.backbone = truncated_model(base)
    wrapper.value_head = torch.nn.Linear(D, D, bias=False)
    with torch.no_grad():
        wrapper.value_head.weight.copy_(head)
    target = ["q_proj", "v_proj", "down_proj"]
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, bias="none", use_rslora=True, target_modules=target),
        wrapper.backbone,
    )
    with torch.no_grad():
        for name, param in wrapper.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would make the adapter a no-op
                param.copy_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    state = {
        n: p.detach().contiguous() for n, p in wrapper.named_parameters() if "lora_" in n or n.startswith("value_head")
    }
    save_file(state, str(dest / "ar_lora_value_head.safetensors"))
    meta = {"ar_num_layers": LAYER + 1, "lora_r": 4, "lora_alpha": 16, "quant": "none", "target_modules": target}
    (dest / "ar_meta.json").write_text(json.dumps({**meta, "final_norm_stripped": True}))
    write_yaml(dest, public_sidecar("nla_dataset", "ar", str(base), None, None))
    return dest, {"head": head, "lora": wrapper.backbone, "special": False}


def direct_reconstruction(base: Path, how: dict, texts: list[str]) -> torch.Tensor:
    """v̂ as the reference computes it: the filled template as one string, the output of block K at the last
    token (HF hidden states; PEFT's LoRA forward for nanoNLA), rescaled to √d, times the head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(
                AR_TEMPLATE.format(explanation=text), add_special_tokens=how["special"], return_tensors="pt"
            )
            if how["lora"] is None:
                model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
                h = model(**ids, output_hidden_states=True).hidden_states[LAYER + 1][0, -1]
            else:
                inner = how["lora"].model
                inner.norm = torch.nn.Identity()
                h = inner(**ids).last_hidden_state[0, -1]
            out.append(how["head"] @ (h / (h.norm() / math.sqrt(D))))
    return torch.stack(out)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", ["kitft", "easynla", "nanonla_lora"])
def test_each_public_ar_layout_reconstructs_the_direct_computation(bases, tmp_path, arch, layout):
    folder, how = public_ar(bases[arch], tmp_path / "ar", layout)
    ar = load_any_ar(folder, "cpu")
    assert ar.meta["ar_layout"] == layout and ar.tokenization == "one_string"
    torch.testing.assert_close(ar.reconstruct(TEXTS), direct_reconstruction(bases[arch], how, TEXTS), **MERGED)


def test_converted_ars_reconstruct_the_same_and_the_kitft_folder_loads_like_a_release(bases, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nla.ar import load_ar

    folder, how = public_ar(bases["llama"], tmp_path / "lora", "nanonla_lora")
    expected = load_any_ar(folder, "cpu").reconstruct(TEXTS)
    convert(folder, tmp_path / "ours")
    torch.testing.assert_close(load_any_ar(tmp_path / "ours", "cpu").reconstruct(TEXTS), expected)
    with pytest.raises(NLAError, match="holds a public"):
        load_ar(tmp_path / "ours", "cpu")
    convert(tmp_path / "ours", tmp_path / "kitft", to="kitft")  # LoRA merged into a truncated model
    torch.testing.assert_close(load_any_ar(tmp_path / "kitft", "cpu").reconstruct(TEXTS), expected, **MERGED)
    # What the paper's client does with the folder: AutoModelForCausalLM, final norm dropped, value head.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "kitft", dtype=torch.float32).eval()
    model.model.norm = torch.nn.Identity()
    assert model.config.num_hidden_layers == LAYER + 1
    from safetensors.torch import load_file

    head = load_file(str(tmp_path / "kitft" / "value_head.safetensors"))["weight"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "kitft")
    ids = tokenizer(AR_TEMPLATE.format(explanation=TEXTS[0]), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        h = model.model(**ids).last_hidden_state[0, -1]
    torch.testing.assert_close(head @ (h / (h.norm() / math.sqrt(D))), expected[0], **MERGED)


# ----------------------------------------------------------------------------- this project's checkpoints out


def our_pair(base: Path, out: Path):
    """This project's AV (full weights, prefilled prompt) and AR (LoRA, piecewise prompt), saved."""
    from peft import PeftModel

    from nla.ar import new_ar
    from nla.av import AV, attach_injector, av_marker
    from nla.config import InjectionConfig, ModelConfig, NLAConfig
    from nla.models import load_model
    from nla.sidecar import make_meta

    model, tokenizer, source = load_model(ModelConfig(name=str(base), layer=LAYER, device="cpu"))
    injection = InjectionConfig(mode="replace", scale=SCALE, marker_char=MARKER)
    marker = av_marker(tokenizer, PromptConfig(), injection)
    meta = make_meta(
        "nla_model",
        "av_sft",
        role="av",
        base_model=str(base),
        d_model=D,
        layer=LAYER,
        marker=marker.to_dict(),
        injection={"mode": "replace", "scale": SCALE, "karvonen_block": 1},
        prompts=PromptConfig().model_dump(),
    )
    AV(model, tokenizer, attach_injector(model, marker, injection), marker, meta).save(out / "av", meta)
    cfg = NLAConfig()
    cfg.model.name, cfg.model.layer, cfg.model.device = str(base), LAYER, "cpu"
    ar = new_ar(cfg, load_model(cfg.model, for_training=True))
    assert isinstance(ar.backbone, PeftModel)
    with torch.no_grad():
        for name, param in ar.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    ar.set_reference(vectors(8, seed=1))
    ar.save(out / "ar")
    return out / "av", out / "ar"


def test_our_checkpoints_written_in_the_released_layout_load_back_identically(bases, tmp_path):
    from nla.ar import load_ar
    from nla.av import load_av

    av_dir, ar_dir = our_pair(bases["qwen3"], tmp_path)
    v = vectors(2)
    av = load_av(av_dir, "cpu")
    expected = [ours(av, row) for row in v]
    expected_ar = load_ar(ar_dir, "cpu").reconstruct(TEXTS)
    convert(av_dir, tmp_path / "kitft-av", to="kitft")
    convert(ar_dir, tmp_path / "kitft-ar", to="kitft")
    assert [ours(load_any_av(tmp_path / "kitft-av", "cpu"), row) for row in v] == expected
    ar = load_any_ar(tmp_path / "kitft-ar", "cpu")
    assert ar.tokenization == "piecewise" and ar.fve_denominator == pytest.approx(
        load_ar(ar_dir, "cpu").fve_denominator
    )
    torch.testing.assert_close(ar.reconstruct(TEXTS), expected_ar, **MERGED)
    public = read_raw_sidecar(tmp_path / "kitft-av")
    assert public["prompt_templates"]["av"] == PromptConfig().av_user.replace("{marker}", "{injection_char}")


def test_publish_writes_the_released_layout_and_its_cards_run(bases, tmp_path, monkeypatch, capsys):
    """`nla publish --format kitft`; the model cards' Python blocks run as written (the Hub is replaced by
    the published folder, as in tests/test_publish.py)."""
    import re

    import huggingface_hub

    from nla.config import NLAConfig
    from nla.publish import run_publish

    av_dir, ar_dir = our_pair(bases["llama"], tmp_path)
    summary = run_publish(NLAConfig(), {"av": av_dir, "ar": ar_dir}, tmp_path / "none.json", tmp_path / "pub", "kitft")
    assert summary["layout"] == "kitft" and "value_head.safetensors" in summary["models"]["ar"]["files"]
    for role in ("av", "ar"):
        folder = tmp_path / "pub" / role
        raw = read_raw_sidecar(folder)
        assert (raw["kind"], raw["schema_version"], raw["role"]) == ("nla_model", 2, role)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, folder=folder: str(folder))
        code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
        exec(compile(code, f"{role}/README.md", "exec"), {})
        printed = capsys.readouterr().out.strip()
        assert printed and (role == "av" or printed == f"torch.Size([1, {D}])")


# ----------------------------------------------------------------------------- the CLI and the Hub


def test_cli_explain_on_a_hub_id_from_the_local_cache_prints_the_reference_tokens(bases, tmp_path):
    """`nla explain --av owner/name --vectors v.pt --json`, resolved by snapshot_download offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-nla-av"
    snapshot = public_av(bases["qwen3"], repo / "snapshots" / commit, "release")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    folder, how = public_ar(bases["qwen3"], tmp_path / "ar", "kitft")
    v = vectors(2)
    torch.save(v, tmp_path / "v.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    cmd = [sys.executable, "-m", "nla", "explain", "--av", "someone/tiny-nla-av", "--ar", str(folder)]
    out = subprocess.run(
        [*cmd, "--vectors", str(tmp_path / "v.pt"), "--json", "--max-new-tokens", str(NEW)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["token_ids"] for r in records] == [reference_tokens(snapshot, row, "replace", SCALE) for row in v]
    assert all(isinstance(r["raw"], str) and r["fve"] is None and -1 <= r["cos"] <= 1 for r in records)
    assert "replace at scale 30" in out.stderr and "layout kitft" in out.stderr
    assert resolve_checkpoint(snapshot) == snapshot


def test_cli_refuses_bad_checkpoints_in_one_line(bases, tmp_path, capsys):
    from nla.cli import main

    folder = public_av(bases["qwen3"], tmp_path / "av", "actor", injection_token_id=7)
    torch.save(vectors(1), tmp_path / "v.pt")
    assert main(["explain", "--av", str(folder), "--vectors", str(tmp_path / "v.pt")]) == 2
    assert main(["convert", str(tmp_path / "nope" / "x"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "encodes the marker" in err[0] and "not found" in err[1]


def test_unfetchable_hub_ids_and_incomplete_ar_folders_are_refused_in_one_line(bases, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NLAError, match="cannot fetch nobody/nothing from the Hugging Face Hub") as err:
        resolve_checkpoint("nobody/nothing")
    assert "\n" not in str(err.value)
    folder = tmp_path / "ar"
    folder.mkdir()
    write_yaml(folder, public_sidecar("release", "ar", str(bases["qwen3"]), None, None))
    with pytest.raises(NLAError, match="none of the public AR files"):
        load_any_ar(folder, "cpu")
