"""Marker sites, both injection formulas against hand computations, batching, checkpointing, generation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from nla.errors import NLAError
from nla.injection import ActivationInjector, Marker, anchor_marker, choose_marker_char, find_sites
from nla.models import decoder_blocks, input_embeddings

MARKER = Marker("─", token_id=7, left_id=5, right_id=9)
ALPHA = 3.0


def prompt_ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def batch(n: int = 3, seed: int = 0) -> torch.Tensor:
    """n rows of random tokens (ids >= 20, so never a marker or neighbour) with one anchored site each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, 500, (n, 12), generator=g)
    for i in range(n):
        c = 3 + i  # a different column per row
        ids[i, c - 1 : c + 2] = torch.tensor([MARKER.left_id, MARKER.token_id, MARKER.right_id])
    return ids


def vectors(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 50


def capture(module, pre: bool = False):
    """Record a module's output (or, with pre=True, its first input) on every call."""
    seen: list[torch.Tensor] = []

    def out_hook(mod, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    def pre_hook(mod, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = (
        module.register_forward_pre_hook(pre_hook, with_kwargs=True) if pre else module.register_forward_hook(out_hook)
    )
    return seen, handle


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------- sites and anchoring


def test_find_sites_needs_both_neighbours():
    ids = prompt_ids(
        [1, 5, 7, 9, 2],  # anchored: a site
        [1, 4, 7, 9, 2],  # wrong left neighbour
        [1, 5, 7, 8, 2],  # wrong right neighbour
        [7, 9, 5, 7, 9],  # first token has no left neighbour; the second marker is anchored
    )
    rows, cols = find_sites(ids, MARKER)
    assert rows.tolist() == [0, 3] and cols.tolist() == [2, 3]


def test_anchor_marker_records_neighbours_and_rejects_bad_prompts():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "─": 3, "<": 4, ">": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert anchor_marker(fast, "─", [1, 4, 3, 5, 2]) == Marker("─", 3, 4, 5)
    with pytest.raises(NLAError, match="exactly once"):
        anchor_marker(fast, "─", [1, 3, 4, 3, 5])
    with pytest.raises(NLAError, match="first or last"):
        anchor_marker(fast, "─", [3, 4, 5])
    assert choose_marker_char(fast, [(0x3200, 0x33FF), (0x2500, 0x25FF)]) == "─"
    with pytest.raises(NLAError, match="not a single token"):
        choose_marker_char(fast, [(0x2500, 0x25FF)], marker_char="┼")


def test_wrong_neighbours_are_not_sites_so_the_count_check_raises():
    model = tiny_model("llama")
    injector = ActivationInjector(model, MARKER, "replace", ALPHA)
    injector.bind(vectors(1, 64))
    with pytest.raises(NLAError, match="found 0 marker sites for 1 vectors"):
        model(input_ids=prompt_ids([1, 4, 7, 9, 2, 3]))  # marker with the wrong left neighbour


def test_wrong_site_count_raises():
    model = tiny_model("llama")
    injector = ActivationInjector(model, MARKER, "karvonen")
    injector.bind(vectors(4, 64))  # 3 rows, one site each
    with pytest.raises(NLAError, match="found 3 marker sites for 4 vectors"):
        model(input_ids=batch(3))
    injector.bind(vectors(1, 64))
    with pytest.raises(NLAError, match="found 2 marker sites for 1 vectors"):
        model(input_ids=prompt_ids([5, 7, 9, 5, 7, 9]))


def test_bad_vectors_and_inputs_embeds_raise():
    model = tiny_model("llama")
    injector = ActivationInjector(model, MARKER, "replace", ALPHA)
    injector.bind(vectors(3, 32))
    with pytest.raises(NLAError, match="d_model=64"):
        model(input_ids=batch(3))
    with pytest.raises(NLAError, match=r"NaN or Inf in rows \[0, 1, 2\]"):
        injector.bind(torch.full((3, 64), float("nan")))
    injector.bind(vectors(3, 64))
    with pytest.raises(NLAError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(3, 12, 64))
    with pytest.raises(NLAError, match="scale is required"):
        ActivationInjector(model, MARKER, "replace", None)
    with pytest.raises(NLAError, match="out of range"):
        ActivationInjector(model, MARKER, "karvonen", karvonen_block=9)


# ----------------------------------------------------------------------------- the formulas, by hand


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_replace_writes_alpha_unit_vector_at_the_input_of_block_0(arch):
    model = tiny_model(arch)
    ids, v = batch(3), vectors(3, 64)
    seen, handle = capture(decoder_blocks(model)[0], pre=True)
    with torch.no_grad():
        model(input_ids=ids)
        ActivationInjector(model, MARKER, "replace", ALPHA).bind(v)
        model(input_ids=ids)
    handle.remove()
    clean, injected = seen
    # Off the sites, block 0 sees the plain embedding (Gemma scales it by sqrt(d) inside the embedding module) ...
    multiplier = math.sqrt(64) if arch == "gemma3" else 1.0
    torch.testing.assert_close(clean, input_embeddings(model).weight[ids] * multiplier)
    rows, cols = find_sites(ids, MARKER)
    off = torch.ones(ids.shape, dtype=torch.bool)
    off[rows, cols] = False
    torch.testing.assert_close(injected[off], clean[off])
    # ... and at each site exactly alpha * v/|v|, whatever the architecture's embedding scale.
    torch.testing.assert_close(injected[rows, cols], ALPHA * unit(v))
    torch.testing.assert_close(injected[rows, cols].norm(dim=-1), torch.full((3,), ALPHA))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_karvonen_adds_norm_matched_vector_at_the_output_of_block_1(arch):
    model = tiny_model(arch)
    ids, v = batch(3), vectors(3, 64)
    with torch.no_grad():
        seen, handle = capture(decoder_blocks(model)[1])
        logits_clean = model(input_ids=ids).logits
        handle.remove()
        injector = ActivationInjector(model, MARKER, "karvonen")
        seen_after, handle = capture(decoder_blocks(model)[1])  # registered after the injector: sees its result
        injector.bind(v)
        logits_injected = model(input_ids=ids).logits
        handle.remove()
    h, h_new = seen[0], seen_after[0]
    rows, cols = find_sites(ids, MARKER)
    hp = h[rows, cols]
    torch.testing.assert_close(h_new[rows, cols], hp + hp.norm(dim=-1, keepdim=True) * unit(v))
    off = torch.ones(ids.shape, dtype=torch.bool)
    off[rows, cols] = False
    torch.testing.assert_close(h_new[off], h[off])
    # Causal: positions before each row's site are untouched, later ones change.
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        torch.testing.assert_close(logits_injected[r, :c], logits_clean[r, :c])
        assert not torch.allclose(logits_injected[r, c:], logits_clean[r, c:])


@pytest.mark.parametrize("mode", ["replace", "karvonen"])
def test_permuting_batch_rows_permutes_outputs(mode):
    model = tiny_model("qwen3")
    injector = ActivationInjector(model, MARKER, mode, ALPHA)
    ids, v = batch(4), vectors(4, 64)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        injector.bind(v)
        out = model(input_ids=ids).logits
        injector.bind(v[perm])
        out_perm = model(input_ids=ids[perm]).logits
        injector.bind(v[perm])  # vectors permuted but not the rows: outputs must change
        out_mismatch = model(input_ids=ids).logits
    torch.testing.assert_close(out_perm, out[perm])
    assert not torch.allclose(out_mismatch, out)


# ----------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("mode", ["replace", "karvonen"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_same_loss_and_gradients(mode, reentrant):
    ids, v = batch(3), vectors(3, 64)

    def loss_and_grads(checkpointing: bool, inject: bool = True):
        model = tiny_model("llama").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if inject:  # bind, as the SFT trainer does: the backward (and its recomputes) runs after the forward
            ActivationInjector(model, MARKER, mode, ALPHA).bind(v)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_off, grads_off = loss_and_grads(False)
    loss_on, grads_on = loss_and_grads(True)
    loss_plain, _ = loss_and_grads(False, inject=False)
    assert not torch.allclose(loss_off, loss_plain)  # injection is in the graph at all
    torch.testing.assert_close(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and len(grads_off) > 10
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("mode", ["replace", "karvonen"])
def test_generation_injects_prefill_only(mode):
    model = tiny_model("llama")
    injector = ActivationInjector(model, MARKER, mode, ALPHA)
    ids, v = batch(2), vectors(2, 64)
    with torch.no_grad(), injector.bound(v):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            min_new_tokens=5,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        assert injector.n_injections == 1  # one prefill; the 4 decode forwards found no sites and wrote nothing
        seqs = out.sequences
        # Every step's logits equal a full forward (sites in the prompt injected, generated tokens not).
        full = model(input_ids=seqs[:, :-1]).logits[:, ids.shape[1] - 1 :]
    with torch.no_grad(), injector.detached():  # the same model without injection
        clean = model(input_ids=seqs[:, :-1]).logits[:, ids.shape[1] - 1 :]
    steps = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(steps[:, 0], clean[:, 0], atol=1e-3)


@pytest.mark.slow
def test_marker_on_embedded_tokenizer_falls_back_to_box_drawing():
    from nla.models import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source("embedded"))
    from nla.injection import single_token_id

    assert all(single_token_id(tokenizer, chr(cp)) is None for cp in range(0x3200, 0x3400))
    char = choose_marker_char(tokenizer, [(0x3200, 0x33FF), (0x2500, 0x25FF)])
    assert char == "─" and single_token_id(tokenizer, char) is not None
