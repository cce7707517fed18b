"""RL stage: the objective's math on known numbers, and the loop on tiny real models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from nla.config import RLConfig
from nla.grpo import clipped_objective, group_advantages, k3_kl, shaped_rewards


def test_group_advantages_known_numbers():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=4, eps=0.0 + 1e-6)
    std = math.sqrt(5 / 3)  # unbiased std of 1, 2, 3, 4
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-6)
    assert torch.allclose(adv[:4], expected, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # a group with equal rewards carries no signal
    assert abs(float(adv[:4].sum())) < 1e-6


def test_k3_kl_known_numbers():
    logp = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.2), math.log(0.6)])
    kl = k3_kl(logp, ref)
    # exp(Δ) − Δ − 1 with Δ = log(ref/π): Δ = log 0.5, 0, log 2
    expected = torch.tensor([0.5 - math.log(0.5) - 1, 0.0, 2 - math.log(2) - 1])
    assert torch.allclose(kl, expected, atol=1e-6)
    assert (kl >= 0).all()


def test_clipped_objective_known_numbers():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.1, 0.7, 1.0]]))  # ratios, as old = 0
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = clipped_objective(logp, old, logp, adv, mask, epsilon=0.2, beta=0.1)
    # row 0 (A=+1): min(ρ, clip ρ) = 1.2, 1.0, 0.5; row 1 (A=−1): min(−ρ, −clip ρ) = −1.1, −0.8
    surrogate = torch.tensor([1.2, 1.0, 0.5, -1.1, -0.8])
    assert loss.item() == pytest.approx(float(-surrogate.mean()), abs=1e-6)  # KL 0: ref == policy
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7)
    assert stats["clip_frac"] == pytest.approx(2 / 5)  # ρ=1.5 with A>0 and ρ=0.7 with A<0 hit the clip


def test_clipped_objective_gradient_at_ratio_one_is_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.ones(2, 2)
    loss, _ = clipped_objective(logp, logp.detach(), logp.detach(), adv, mask, epsilon=0.2, beta=0.5)
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None].expand(2, 2) / 4)  # KL's gradient vanishes at ref == policy


def test_shaped_rewards_length_cap_and_malformed():
    cfg = RLConfig(length_cap_penalty=0.5, per_token_penalty=0.01, malformed_reward=-2.0)
    mse = torch.tensor([0.4, 0.4, 0.4, 1.0])
    malformed = torch.tensor([False, False, True, True])
    capped = torch.tensor([False, True, False, True])
    n_tokens = torch.tensor([10, 48, 5, 48])
    r = shaped_rewards(mse, malformed, capped, n_tokens, cfg)
    expected = torch.tensor([-0.4 - 0.1, -0.4 - 0.5 - 0.48, -2.0 - 0.05, -2.0 - 0.5 - 0.48])
    assert torch.allclose(r, expected, atol=1e-6)
    log_cfg = RLConfig(reward="neg_log_mse", length_cap_penalty=0.0)
    r_log = shaped_rewards(mse[:1], malformed[:1], capped[:1], n_tokens[:1], log_cfg)
    assert r_log.item() == pytest.approx(-math.log(0.4), abs=1e-6)


# ----------------------------------------------------------------------------- the loop on tiny real models
#
# The "subject" is a tiny random llama with the embedded tokenizer (vocab 49152), warm-started
# for a few seconds to answer " cat</explanation>" or " dog</explanation>" about half the time.
# The "SFT AV" is a LoRA adapter on it whose B matrices are non-zero, so the SFT AV differs from
# the bare base: a reference built with disable_adapter() would be caught.

TARGET_WORDS = (" cat", " dog")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (thread sync dominates), the more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nla.av import AV, attach_injector, av_marker
    from nla.config import InjectionConfig, PromptConfig
    from nla.models import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source("embedded"))
    prompts = PromptConfig()
    marker = av_marker(tok, prompts, InjectionConfig())
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )

    def base_model():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def wrap(model):
        injector = attach_injector(model, marker, InjectionConfig(), scale=1.0)
        return AV(model, tok, injector, marker, {"d_model": 64, "layer": 1, "base_model": "tiny"}, prompts)

    base = wrap(base_model())
    targets = [
        tok(w + prompts.av_answer_close, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for w in TARGET_WORDS
    ]
    opt = torch.optim.Adam(base.model.parameters(), lr=2e-2)
    for _ in range(40):  # warm start: p(cat) ≈ p(dog) ≈ 1/2, whatever the vector
        logp, mask = base.completion_log_probs(torch.randn(8, 64), [targets[i % 2] for i in range(8)])
        opt.zero_grad()
        (-(logp.sum() / mask.sum())).backward()
        opt.step()
    base_state = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    base.injector.remove()
    base_dir = tmp_path_factory.mktemp("tiny_base")  # the warm-started subject model as a local model folder
    base.model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    sft_dir = tmp_path_factory.mktemp("sft_av")
    torch.manual_seed(1)
    lora = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a "trained" adapter: the SFT AV is not the bare base
    lora.save_pretrained(sft_dir)

    def make_av():
        from peft import PeftModel

        model = base_model()
        model.load_state_dict(base_state)
        return wrap(PeftModel.from_pretrained(model, str(sft_dir), is_trainable=True).eval())

    def make_ar():
        from nla.ar import new_ar
        from nla.config import ModelConfig, NLAConfig

        torch.manual_seed(2)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return new_ar(NLAConfig(model=ModelConfig(layer=1)), loaded=(model, tok, SimpleNamespace(fingerprint="tiny")))

    return SimpleNamespace(make_av=make_av, make_ar=make_ar, sft_dir=sft_dir, base_dir=base_dir, marker=marker)


def test_generation_uses_a_merged_copy_that_follows_the_trained_adapter(tiny_setup):
    """RL samples from a merged copy of the LoRA AV: greedy tokens equal those of the unmerged
    model, also after an optimizer step on the adapter (the copy is re-synced in place)."""
    from nla.sampling import sample

    av = tiny_setup.make_av()
    vectors = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    prompt = torch.tensor([av.prompt_ids] * 4)

    def unmerged_greedy() -> list[tuple[int, ...]]:
        with av.injector.bound(vectors):
            new = sample(av.model, prompt, torch.ones_like(prompt), 8, 0.0, {av.tokenizer.eos_token_id}, pad_id=0)
        return [
            tuple(row[: row.index(av.tokenizer.eos_token_id) + 1] if av.tokenizer.eos_token_id in row else row)
            for row in new.tolist()
        ]

    assert [e.token_ids for e in av.generate(vectors, 8)] == unmerged_greedy()
    assert av._merged is not None and len(av._merged._pairs) > 0
    opt = torch.optim.SGD([p for p in av.model.parameters() if p.requires_grad], lr=5.0)
    logp, mask = av.completion_log_probs(vectors, [[5, 6, 7]] * 4)
    (-logp.sum()).backward()
    opt.step()
    after = [e.token_ids for e in av.generate(vectors, 8)]
    assert after == unmerged_greedy()
    assert not any(p.requires_grad for p in av._merged.model.parameters())
    assert av.injector.vectors is None and av._merged.injector.vectors is None  # nothing left bound


def test_reference_is_the_sft_adapter_and_kl_is_zero_at_step_0(tiny_setup):
    from nla.rl import reference_log_probs, rl_step

    make_av, make_ar, sft_dir = tiny_setup.make_av, tiny_setup.make_ar, tiny_setup.sft_dir
    av, ar = make_av(), make_ar()
    ref = reference_log_probs(av, sft_dir)
    torch.manual_seed(0)
    samples = av.generate(torch.randn(6, 64), max_new_tokens=8, temperature=1.0)
    vectors, ids = torch.randn(6, 64), [list(s.token_ids) for s in samples]
    with torch.no_grad():
        policy = av.completion_log_probs(vectors, ids)[0]
        with av.model.disable_adapter():
            bare = av.completion_log_probs(vectors, ids)[0]
    assert torch.allclose(ref(vectors, ids), policy, atol=1e-6)
    assert (bare - policy).abs().max() > 1e-3  # the bare base model would be the wrong reference
    assert all(p.requires_grad for n, p in av.model.named_parameters() if "lora" in n and ".default." in n)
    assert not any(p.requires_grad for n, p in av.model.named_parameters() if ".ref." in n)

    cfg = RLConfig(prompts_per_step=2, group_size=4, max_new_tokens=8, beta=0.5)
    params = [p for p in av.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    first = rl_step(av, ref, ar, torch.randn(2, 64), cfg, opt, None, None)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["clip_frac"] == 0.0
    second = rl_step(av, ref, ar, torch.randn(2, 64), cfg, opt, None, None)
    assert second["kl"] > 1e-6  # after one update the policy has moved away from the frozen reference
    assert torch.allclose(ref(vectors, ids), policy, atol=1e-6)  # and the reference has not


class KeywordAR:
    """A fixed reconstructor: explanations saying "cat" reconstruct e0 (the target), others e1 (orthogonal)."""

    mean_unit = None

    def __init__(self, d: int):
        self.e0, self.e1 = torch.eye(d)[0], torch.eye(d)[1]

    def reconstruct(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.e0 if "cat" in t else self.e1 for t in texts])

    def parameters_to_train(self) -> list:
        return []


def cat_rate(av, vector: torch.Tensor, n: int = 64) -> float:
    torch.manual_seed(123)
    samples = av.generate(vector.expand(n, -1), max_new_tokens=8, temperature=1.0, batch_size=n)
    return sum("cat" in s.text for s in samples) / n


def test_rl_raises_the_reward_on_a_controlled_problem(tiny_setup, tmp_path):
    from nla.rl import reference_log_probs, train_rl

    make_av, sft_dir = tiny_setup.make_av, tiny_setup.sft_dir
    av = make_av()
    ar = KeywordAR(64)
    vectors = ar.e0 + 0.05 * torch.randn(16, 64)
    before = cat_rate(av, vectors[0])
    cfg = RLConfig(
        steps=20,
        prompts_per_step=4,
        group_size=8,
        max_new_tokens=8,
        actor_learning_rate=3e-3,
        beta=0.02,
        checkpoint_every=100,
    )
    state = train_rl(av, ar, reference_log_probs(av, sft_dir), vectors, cfg, tmp_path, train_ar=False)
    after = cat_rate(av, vectors[0])
    rewards = [e["reward_mean"] for e in state.log]
    assert after > before + 0.15, (before, after)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards
    assert state.log[-1]["kl"] > 0


def test_resume_after_crash_matches_uninterrupted_run(tiny_setup, tmp_path, monkeypatch):
    import nla.rl as rl

    make_av, make_ar, sft_dir = tiny_setup.make_av, tiny_setup.make_ar, tiny_setup.sft_dir
    torch.manual_seed(5)
    vectors = torch.randn(8, 64)
    cfg = RLConfig(
        steps=4,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=8,
        checkpoint_every=2,
        eval_every=2,
        actor_learning_rate=1e-2,
        ar_learning_rate=1e-3,
    )
    real_step = rl.rl_step

    def run(work, crash_at: int | None = None):
        calls = []

        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == crash_at:
                raise RuntimeError("simulated crash")
            return real_step(*args, **kwargs)

        monkeypatch.setattr(rl, "rl_step", step)
        av, ar = make_av(), make_ar()
        ar_ref = vectors[:2]
        state = rl.train_rl(
            av,
            ar,
            rl.reference_log_probs(av, sft_dir),
            vectors,
            cfg,
            work,
            eval_vectors=ar_ref,
            mean_unit=vectors.mean(0) / vectors.mean(0).norm(),
            fingerprint="f",
        )
        return state, len(calls)

    full, full_calls = run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed", crash_at=4)  # steps 1-3 done, last checkpoint at step 2
    resumed, resumed_calls = run(tmp_path / "crashed")
    assert (full_calls, resumed_calls) == (4, 2)  # the resumed run did steps 3 and 4 only
    assert [e["step"] for e in resumed.log] == [1, 2, 3, 4]
    assert [e["step"] for e in resumed.eval_log] == [0, 2, 4]
    timings = {"seconds", "generate_seconds"}
    for a, b in zip(full.log, resumed.log, strict=True):
        assert {k: v for k, v in a.items() if k not in timings} == pytest.approx(
            {k: v for k, v in b.items() if k not in timings}, nan_ok=True
        )

    blob_full = torch.load(tmp_path / "full" / rl.CHECKPOINT / rl.STATE_FILE, weights_only=True)
    blob_res = torch.load(tmp_path / "crashed" / rl.CHECKPOINT / rl.STATE_FILE, weights_only=True)
    assert blob_full["step"] == blob_res["step"] == 4
    for key in ("av_opt", "ar_opt"):
        assert blob_full[key]["state"].keys() == blob_res[key]["state"].keys()
        for i, st in blob_full[key]["state"].items():
            assert st["step"] == blob_res[key]["state"][i]["step"]  # the AR skips steps whose samples are all malformed
            assert torch.allclose(st["exp_avg"], blob_res[key]["state"][i]["exp_avg"], atol=1e-6)
            assert torch.allclose(st["exp_avg_sq"], blob_res[key]["state"][i]["exp_avg_sq"], atol=1e-8)
    for a, b in zip(
        blob_full["av_params"] + blob_full["ar_params"], blob_res["av_params"] + blob_res["ar_params"], strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6)


def test_run_rl_writes_loadable_checkpoints_and_logs(tiny_setup, tmp_path):
    """The stage end to end on tiny checkpoints: full-weight AV (reference = a second frozen copy), LoRA AR."""
    import numpy as np
    import pandas as pd

    from nla.ar import load_ar, new_ar
    from nla.av import load_av
    from nla.config import ModelConfig, NLAConfig
    from nla.data import ACTIVATIONS_FILE, SPLITS_FILE
    from nla.io import write_table
    from nla.rl import CHECKPOINT, run_rl
    from nla.sidecar import make_meta, read_sidecar, write_sidecar

    base = str(tiny_setup.base_dir)
    cfg = NLAConfig(model=ModelConfig(name=base, layer=1, device="cpu"))
    cfg.rl = RLConfig(
        steps=2, prompts_per_step=2, group_size=2, max_new_tokens=6, eval_every=1, eval_rows=4, checkpoint_every=1
    )
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 64)).astype(np.float32)
    act, split = tmp_path / "act", tmp_path / "split"
    write_table(act / ACTIVATIONS_FILE, pd.DataFrame({"row_id": np.arange(12), "vector": list(vectors)}))
    write_sidecar(act, make_meta("nla_dataset", "extract", base_model=base, d_model=64, layer=1))
    write_table(split / SPLITS_FILE, pd.DataFrame({"row_id": np.arange(12), "split": ["rl"] * 6 + ["eval"] * 6}))
    write_sidecar(split, make_meta("nla_dataset", "split", base_model=base, d_model=64, layer=1))

    av_dir, ar_dir = tmp_path / "av_sft", tmp_path / "ar_sft"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(base).save_pretrained(av_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(av_dir)
    write_sidecar(
        av_dir,
        make_meta(
            "nla_model",
            "av_sft",
            role="av",
            base_model=base,
            d_model=64,
            layer=1,
            weights="full",
            dtype="float32",
            marker=tiny_setup.marker.to_dict(),
            prompts=cfg.prompts.model_dump(),
            injection={"mode": "replace", "scale": 1.0, "karvonen_block": 1},
        ),
    )
    ar = new_ar(cfg)
    ar.set_reference(torch.from_numpy(vectors[:6]))
    ar.save(ar_dir)

    out, work = tmp_path / "rl", tmp_path / "work"
    metrics = run_rl(cfg, act, split, av_dir, ar_dir, out, work_dir=work)

    assert metrics["steps"] == 2 and {"fve_heldout_start", "fve_heldout_end", "reward_first"} <= set(metrics)
    log = pd.read_csv(out / "rl_log.csv")
    assert list(log.step) == [1, 2] and np.isfinite(log.reward_mean).all()
    assert list(pd.read_csv(out / "rl_eval.csv").step) == [0, 1, 2]
    assert not (work / CHECKPOINT).exists()  # a finished run leaves nothing to resume
    for role, loader in (("av", load_av), ("ar", load_ar)):
        meta = read_sidecar(out / role)
        assert meta["stage"] == "rl" and str(av_dir) in meta["parents"] and meta["role"] == role
        assert loader(out / role, "cpu") is not None
    before = AutoModelForCausalLM.from_pretrained(av_dir).state_dict()
    after = load_av(out / "av", "cpu").model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the saved AV is the trained policy


def test_a_rollout_that_echoes_the_marker_is_masked_not_fatal(tiny_setup):
    """A completion holding the anchored marker would add an injection site to its own log-prob pass.
    RL scores it as malformed, leaves it out of the policy loss, counts it, and carries on."""
    from nla.av import Explanation
    from nla.rl import reference_log_probs, rl_step

    av, ar, m = tiny_setup.make_av(), tiny_setup.make_ar(), tiny_setup.marker
    eos = av.tokenizer.eos_token_id
    clean = Explanation("a cat", (5, 6, eos), True)
    echo = Explanation("a ─ cat", (5, m.left_id, m.token_id, m.right_id, eos), True)  # a full anchored site
    av.generate = lambda vectors, *args, **kwargs: [echo if i % 4 == 0 else clean for i in range(len(vectors))]
    cfg = RLConfig(prompts_per_step=2, group_size=4, max_new_tokens=8)
    params = [p for p in av.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    out = rl_step(
        av,
        reference_log_probs(av, tiny_setup.sft_dir),
        ar,
        torch.randn(2, 64),
        cfg,
        torch.optim.SGD(params, lr=1.0),
        None,
    )
    assert out["marker_echo_frac"] == pytest.approx(0.25)
    assert out["malformed_frac"] == pytest.approx(0.25)
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))  # the other rows still trained


def test_a_non_finite_loss_skips_the_update():
    from nla.rl import _update

    weight = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([weight], lr=1.0)
    assert _update(opt, (weight * float("nan")).sum(), 1.0, 3) == 1
    assert _update(opt, (weight * torch.tensor([1.0, float("inf"), 1.0])).sum(), 1.0, 3) == 1
    assert torch.equal(weight.detach(), torch.ones(3))  # neither step touched the weights
    assert _update(opt, weight.sum(), 10.0, 3) == 0 and not torch.equal(weight.detach(), torch.ones(3))


def test_duplicate_share_within_groups():
    from nla.grpo import duplicate_share

    shares = duplicate_share(["a", "a", "a", "b", "x", "y", "z", "w"], group_size=4)
    assert shares.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_no_loss_on_tokens_after_end_of_sequence(tiny_setup):
    """Completions stop at EOS; log-probs and the mask cover tokens up to and including it, nothing after."""
    av = tiny_setup.make_av()
    eos = av.tokenizer.eos_token_id
    logp, mask = av.completion_log_probs(torch.randn(2, 64), [[5, eos], [5, 6, 7, eos]])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert (logp[0, 2:] == 0).all()  # padding after the first row's EOS carries no log-prob, so no gradient
