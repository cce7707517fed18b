"""The activation reconstructor: architecture, read position, training step, save/load and sidecar checks."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import tiny_model
from embedded_pipeline import shared_run
from torch import nn

from nla.ar import AR, identity_head, last_token_index, load_ar, new_ar, truncate_to_layer
from nla.config import NLAConfig
from nla.data import labeled_rows, vectors_of
from nla.errors import NLAError
from nla.models import residual_at

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "final", "token", "context", "explanation", "of", "state"]
WORDS += ["language", "model", "internal", "is", "in", "paris"]


def tiny_tokenizer():
    """A real word-level fast tokenizer over a small vocabulary (ids < the tiny model's vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama saved as a local model folder with its tokenizer: loads through nla.models like any model."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_cfg(folder, **ar_sft) -> NLAConfig:
    return NLAConfig.model_validate(
        {
            "model": {"name": str(folder), "layer": 2, "device": "cpu"},
            "ar_sft": {"lora": {"r": 4, "alpha": 8}, **ar_sft},
        }
    )


def bare_ar(arch: str, layer: int) -> tuple[AR, nn.Module]:
    """An untrained AR from a tiny random model, plus an untouched copy of that model."""
    full = tiny_model(arch)
    backbone, _ = truncate_to_layer(tiny_model(arch), layer)
    meta = {
        "d_model": full.config.hidden_size,
        "prompts": {"ar_template": "{explanation}"},
        "max_explanation_tokens": 64,
    }
    return AR(backbone, None, meta).eval(), full


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_architecture_blocks_norm_and_identity_head(arch):
    ar, full = bare_ar(arch, layer=1)
    assert len(ar.backbone.layers) == 2
    assert isinstance(ar.backbone.norm, nn.Identity)
    assert ar.head.bias is None
    assert torch.equal(ar.head.weight, torch.eye(ar.d))
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        expected = residual_at(full, 1, ids)[0, -1]  # output of block K, no final norm
        got = ar(ids, torch.ones_like(ids))[0]
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


def test_last_token_index_both_paddings():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_read_position_is_last_real_token_with_left_and_right_padding(arch):
    ar, _ = bare_ar(arch, layer=2)
    torch.manual_seed(1)
    seqs = [torch.randint(2, 512, (n,)).tolist() for n in (7, 3, 5)]
    width = 7

    def batch(side: str):
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            ids[r, span], mask[r, span] = torch.tensor(s), 1
        return ids, mask

    with torch.no_grad():
        right, left = ar(*batch("right")), ar(*batch("left"))
        alone = torch.cat([ar(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    torch.testing.assert_close(right, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(left, alone, rtol=1e-4, atol=1e-4)


def test_identity_head_is_identity_map():
    head = identity_head(16)
    x = torch.randn(3, 16)
    assert torch.equal(head(x), x)


def test_encode_pads_both_sides_with_a_real_tokenizer(tiny_dir):
    ar = new_ar(tiny_cfg(tiny_dir)).eval()
    texts = ["the cat sat on the mat", "a dog", ""]
    with torch.no_grad():
        right, left = ar(*ar.encode(texts, "right")), ar(*ar.encode(texts, "left"))
    torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ar.reconstruct(texts, batch_size=2), ar.reconstruct(texts, batch_size=3))


@pytest.mark.parametrize("lora", [True, False])
def test_training_steps_lower_the_loss(tiny_dir, lora):
    ar = new_ar(tiny_cfg(tiny_dir, lora={"enabled": lora, "r": 4, "alpha": 8}))
    texts = ["the cat sat on the mat", "a dog is in paris", "final token of the state", "language model"]
    targets = torch.randn(4, ar.d)
    optimizer = torch.optim.AdamW(ar.param_groups(1e-3, 1e-2))
    losses = []
    for _ in range(8):
        loss = ar.loss(texts, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert 0 <= losses[0] <= 4
    assert losses[-1] < losses[0] - 0.05
    assert any(p.grad is not None for p in ar.head.parameters())


def test_train_last_blocks_freezes_the_rest(tiny_dir):
    ar = new_ar(tiny_cfg(tiny_dir, train_last_blocks=1))
    trainable = {n for n, p in ar.named_parameters() if p.requires_grad}
    assert any(".layers.2." in n and "lora" in n for n in trainable)
    assert not any(".layers.0." in n or ".layers.1." in n for n in trainable)
    assert ar.meta["trained_blocks"] == [2, 2]


def saved_ar(tiny_dir, folder, lora=True):
    ar = new_ar(tiny_cfg(tiny_dir, lora={"enabled": lora, "r": 4, "alpha": 8}))
    with torch.no_grad():
        ar.head.weight.add_(0.01 * torch.randn_like(ar.head.weight))  # a trained-looking head
        for name, p in ar.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ar.set_reference(torch.randn(10, ar.d))
    ar.save(folder, {"stage": "ar_sft", "parents": []})
    return ar


@pytest.mark.parametrize("lora", [True, False])
def test_save_and_load_give_the_same_reconstruction(tiny_dir, tmp_path, lora):
    ar = saved_ar(tiny_dir, tmp_path / "ar", lora)
    texts = ["the cat sat", "a dog is in paris", ""]
    loaded = load_ar(tmp_path / "ar", device="cpu")
    torch.testing.assert_close(loaded.reconstruct(texts), ar.reconstruct(texts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.mean_unit, ar.mean_unit)
    assert loaded.fve_denominator == pytest.approx(ar.fve_denominator)
    meta = yaml.safe_load((tmp_path / "ar" / "nla_meta.yaml").read_text())
    assert meta["role"] == "ar" and meta["kind"] == "nla_model" and meta["layer"] == 2
    assert meta["prompts"]["ar_template"] == NLAConfig().prompts.ar_template
    assert meta["finetune"] == ("lora" if lora else "full")
    assert len(loaded.parameters_to_train()) > 1  # trainable after loading (RL continues training it)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("d_model", 65, "d_model"),
        ("base_model_fingerprint", "dir:/elsewhere", "resolves to"),
        ("role", "av", "not an AR"),
    ],
)
def test_sidecar_mismatch_raises(tiny_dir, tmp_path, key, value, message):
    saved_ar(tiny_dir, tmp_path / "ar")
    path = tmp_path / "ar" / "nla_meta.yaml"
    meta = yaml.safe_load(path.read_text())
    meta[key] = value
    path.write_text(yaml.safe_dump(meta))
    with pytest.raises(NLAError, match=message):
        load_ar(tmp_path / "ar", device="cpu")


@pytest.mark.slow
def test_ar_on_the_embedded_model_trains_saves_and_loads_back(embedded_run, tmp_path):
    """The real AR on the real stages' rows: loss goes down, save → load gives the same reconstruction."""
    from nla.ar_sft import fit_ar

    rows = labeled_rows(embedded_run["act"], embedded_run["split"], embedded_run["labels"], ["ar_sft"])
    texts, targets = rows.explanation.tolist()[:4], torch.from_numpy(vectors_of(rows))[:4]
    cfg = NLAConfig.model_validate({"ar_sft": {"max_steps": 4, "batch_size": 4, "warmup_ratio": 0.0}})
    ar, log, metrics = fit_ar(cfg, texts, targets)
    assert log[-1]["loss"] < log[0]["loss"]
    assert metrics["ar_sft_steps"] == 4
    ar.save(tmp_path / "ar", {"stage": "ar_sft"})
    loaded = load_ar(tmp_path / "ar", device="cpu")
    torch.testing.assert_close(loaded.reconstruct(texts), ar.reconstruct(texts), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded.mean_unit, ar.mean_unit)


@pytest.mark.slow
def test_ar_sft_stage_writes_checkpoint_log_and_metrics(embedded_run, tmp_path):
    ar_dir = embedded_run["ar"]  # built by run_ar_sft in the shared run (2 steps)
    for name in (
        "adapter_model.safetensors",
        "head.safetensors",
        "mean_unit.safetensors",
        "nla_meta.yaml",
        "tokenizer.json",
    ):
        assert (ar_dir / name).is_file(), name
    loss_csv = ar_dir.with_name("ar_loss.csv")
    assert loss_csv.read_text().splitlines()[0].startswith("step,epoch,loss")
    assert len(loss_csv.read_text().splitlines()) == 3
    meta = yaml.safe_load((ar_dir / "nla_meta.yaml").read_text())
    rows = labeled_rows(embedded_run["act"], embedded_run["split"], embedded_run["labels"], ["ar_sft"])
    assert meta["train_rows"] == len(rows) and meta["stage"] == "ar_sft" and meta["d_model"] == 576
    assert meta["train_av_explanations"] == 3 and str(embedded_run["av"]) in meta["parents"]
    assert meta["base_model_fingerprint"].startswith("gguf:") and 0 < meta["mean_unit_norm"] < 1
    assert (ar_dir.with_name("ar_metrics.json")).is_file()


@pytest.mark.slow
def test_av_pairs_pair_the_avs_greedy_explanations_with_their_rows_true_vectors(embedded_run):
    """The "mix" data: each AV text sits beside the vector it was generated from, and that is its row's vector."""
    from nla.ar_sft import av_pairs
    from nla.av import load_av

    rows = labeled_rows(embedded_run["act"], embedded_run["split"], embedded_run["labels"], ["ar_sft"])
    cfg = NLAConfig.model_validate(
        {"model": {"autocast": "off"}, "ar_sft": {"av_explanations": 3, "av_max_new_tokens": 8, "seed": 1}}
    )
    texts, vectors, ids = av_pairs(cfg, embedded_run["av"], rows, "cpu")
    assert len(texts) == len(ids) == 3 and vectors.shape == (3, 576) and len(set(ids)) == 3
    by_id = rows.set_index("row_id")
    torch.testing.assert_close(vectors, torch.from_numpy(vectors_of(by_id.loc[ids].reset_index())))
    again = load_av(embedded_run["av"], "cpu").generate(vectors[2:], 8)  # the last row on its own
    assert texts[2] == again[0].text
    assert av_pairs(cfg, embedded_run["av"], rows, "cpu")[2] == ids  # a fixed-seed sample


def test_ar_sft_without_the_av_says_how_to_fix_it(embedded_run, tmp_path):
    from nla.ar_sft import run_ar_sft

    cfg = NLAConfig.model_validate({"ar_sft": {"max_steps": 1, "av_explanations": 2}})
    with pytest.raises(NLAError, match="needs the SFT AV.*set it to 0"):
        run_ar_sft(cfg, embedded_run["act"], embedded_run["split"], embedded_run["labels"], tmp_path / "ar")


def test_drop_lines_keeps_the_final_line_and_drops_only_from_the_share_drawn():
    """About `share` of the labels lose 1 to all lines before the last; the last always stays; same seed, same texts."""
    from nla.ar_sft import drop_lines

    label = 'Before: "the".\nNext likely: "war", "army".\nFinal token "big".'
    texts = [label] * 400 + ["one line only"]
    dropped = drop_lines(texts, 0.3, seed=0)
    assert dropped == drop_lines(texts, 0.3, seed=0)
    assert dropped[-1] == "one line only"
    changed = [t for t in dropped[:-1] if t != label]
    assert 0.22 < len(changed) / 400 < 0.38
    assert all(t.endswith('Final token "big".') for t in dropped[:-1])
    assert {t.count("\n") for t in changed} == {0, 1}  # final line alone, or one context line kept
    assert drop_lines(texts, 0.0, seed=0) == texts
