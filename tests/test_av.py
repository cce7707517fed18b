"""The AV: completion parsing, injection scale, SFT with TRL, α sweep, load_av checks, generation, log-probs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from nla.av import completion_ids, injection_scale, load_av, parse_completion
from nla.av_sft import run_av_sft
from nla.config import InjectionConfig, NLAConfig, PromptConfig
from nla.data import EXPLANATIONS_FILE, load_rows
from nla.errors import NLAError
from nla.extract import run_extract, run_split
from nla.io import write_table
from nla.sidecar import make_meta, read_sidecar, write_sidecar
from nla.sweep import run_sweep_alpha

PROMPTS = PromptConfig()
TEXTS = [
    "The Eiffel Tower is in Paris, the capital of France, and it was built for the world fair of 1889.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen every day.",
    "The football match ended in a draw after both teams scored twice in the second half of the game.",
    "Interest rates rose again this year as the central bank tried to slow down inflation in the economy.",
    "She opened the old wooden box and found a stack of letters written by her grandmother during the war.",
    "Python functions are defined with the def keyword, followed by a name and a list of parameters.",
    "Heavy rain flooded several streets in the city centre, and the police closed two bridges overnight.",
    "The orchestra played a symphony by Beethoven, and the audience stood to applaud at the very end.",
]


def test_parse_completion_strips_tags_and_reports_closing():
    assert parse_completion("  A news   report.\nFinal token 'a'.</explanation>", PROMPTS) == (
        "A news report. Final token 'a'.",
        True,
    )
    assert parse_completion("<explanation>cut off mid", PROMPTS) == ("cut off mid", False)
    assert parse_completion("</explanation> trailing", PROMPTS) == ("", True)


def test_injection_scale_precedence(tmp_path):
    meta = {"norm_quantiles": {"0.5": 10.0, "0.75": 12.5}}
    assert injection_scale(InjectionConfig(mode="karvonen"), meta)[0] is None
    assert injection_scale(InjectionConfig(scale=3.0), meta) == (3.0, "params: injection.scale")
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"alpha": 7.0}))
    scale, how = injection_scale(InjectionConfig(), meta, sweep)
    assert scale == 7.0 and "sweep" in how
    scale, how = injection_scale(InjectionConfig(), meta)
    assert scale == 12.5 and "75th percentile" in how
    with pytest.raises(NLAError, match="norm_quantiles"):
        injection_scale(InjectionConfig(), {})
    scale, how = injection_scale(InjectionConfig(), meta, tmp_path / "missing.json")  # the sweep is optional
    assert scale == 12.5 and "no sweep result" in how
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(NLAError, match="not an α sweep result"):
        injection_scale(InjectionConfig(), meta, tmp_path / "bad.json")


# ----------------------------------------------------------------------------- a real tiny pipeline


def tiny_cfg() -> NLAConfig:
    cfg = NLAConfig()
    cfg.extract.max_tokens, cfg.extract.positions_per_doc, cfg.extract.min_position = 32, 2, 4
    cfg.split.fractions = {"av_sft": 1.0, "ar_sft": 0.0, "rl": 0.0, "eval": 0.0}
    cfg.av_sft.max_steps, cfg.av_sft.batch_size, cfg.av_sft.max_length = 2, 4, 96
    cfg.av_sft.merge = True
    cfg.sweep.alphas, cfg.sweep.steps, cfg.sweep.eval_rows = [4.0, 250.0], 1, 4
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real activations of the embedded model (16 rows from 8 documents) with stand-in labels."""
    root = tmp_path_factory.mktemp("av")
    cfg = tiny_cfg()
    docs = pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(TEXTS))], "text": TEXTS, "source": "test"})
    write_table(root / "documents.parquet", docs)
    run_extract(cfg, root / "documents.parquet", root / "act", work_dir=root / "work")
    run_split(cfg, root / "act", root / "split", needed=("av_sft",))
    rows = load_rows(root / "act", root / "split")
    labels = pd.DataFrame(
        {
            "row_id": rows.row_id,
            "doc_id": rows.doc_id,
            "split": rows.split,
            "explanation": [
                f"Final token: '{t.strip()}'. Context: {' '.join(p.split()[-5:])}"
                for t, p in zip(rows.token, rows.prefix, strict=True)
            ],
            "backend": "test",
            "n_features": 2,
        }
    )
    write_table(root / "labels" / EXPLANATIONS_FILE, labels)
    meta = read_sidecar(root / "act")
    meta.update(make_meta("nla_dataset", "label", labeler={"backend": "test"}, parents=[str(root / "act")]))
    write_sidecar(root / "labels", meta)
    return cfg, root, rows


@pytest.fixture(scope="module")
def trained(data):
    cfg, root, _ = data
    sweep = run_sweep_alpha(
        cfg, root / "act", root / "split", root / "labels", root / "sweep.json", work_dir=root / "work" / "sweep"
    )
    metrics = run_av_sft(
        cfg,
        root / "act",
        root / "split",
        root / "labels",
        root / "av",
        sweep_path=root / "sweep.json",
        metrics_path=root / "metrics" / "av_sft.json",
        plots_path=root / "plots" / "av_sft_loss.csv",
        work_dir=root / "work" / "av_sft",
    )
    return cfg, root, sweep, metrics


@pytest.mark.slow
def test_sweep_picks_the_largest_gap(trained):
    _, root, sweep, _ = trained
    assert json.loads((root / "sweep.json").read_text()) == json.loads(json.dumps(sweep))
    assert [r["alpha"] for r in sweep["table"]] == [4.0, 250.0]
    for r in sweep["table"]:
        assert np.isfinite(r["loss_correct"]) and np.isfinite(r["loss_shuffled"])
        assert r["gap"] == pytest.approx(r["loss_shuffled"] - r["loss_correct"])
    assert sweep["alpha"] == max(sweep["table"], key=lambda r: r["gap"])["alpha"]
    assert sweep["heldout_rows"] >= 4 and sweep["train_rows"] + sweep["heldout_rows"] == 16


@pytest.mark.slow
def test_av_sft_writes_checkpoint_sidecar_and_metrics(trained):
    cfg, root, sweep, metrics = trained
    ckpt = root / "av"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "merged/config.json"):
        assert (ckpt / name).is_file(), name
    meta = read_sidecar(ckpt)
    assert (meta["kind"], meta["role"], meta["stage"], meta["weights"]) == ("nla_model", "av", "av_sft", "adapter")
    assert meta["d_model"] == 576 and meta["layer"] == 20 and meta["base_model"] == "embedded"
    assert meta["base_model_fingerprint"].startswith("gguf:")
    assert meta["marker"]["char"] == "─" and {"token_id", "left_id", "right_id"} <= meta["marker"].keys()
    assert meta["injection"]["mode"] == "replace" and meta["injection"]["scale"] == sweep["alpha"]
    assert "sweep" in meta["injection"]["scale_source"]
    assert meta["prompts"] == cfg.prompts.model_dump() and meta["labeler"] == {"backend": "test"}
    assert str(root / "sweep.json") in meta["parents"] and "mse_normalisation" in meta
    assert metrics["steps"] == 2 and metrics["rows"] == 16 and np.isfinite(metrics["loss_last"])
    assert json.loads((root / "metrics" / "av_sft.json").read_text()) == {  # the headline of `dvc metrics show`
        "av_loss": metrics["loss_last_10pct"],
    }
    curve = pd.read_csv(root / "plots" / "av_sft_loss.csv")
    assert curve.step.tolist() == [1, 2] and curve.loss.notna().all()


@pytest.mark.slow
def test_training_examples_mask_the_prompt_and_end_with_close_and_eos(data):
    from nla.av import av_marker, av_prompt_ids
    from nla.av_sft import encode_examples
    from nla.models import load_tokenizer, resolve_source

    _, _, rows = data
    tokenizer = load_tokenizer(resolve_source("embedded"))
    marker = av_marker(tokenizer, PROMPTS, InjectionConfig())
    prompt = av_prompt_ids(tokenizer, PROMPTS, marker.char)
    rows = rows.assign(explanation=["Final token: 'x'."] * len(rows))
    columns = encode_examples(tokenizer, PROMPTS, prompt, rows.head(2))
    ids, mask = columns["input_ids"][0], columns["completion_mask"][0]
    target = completion_ids(tokenizer, PROMPTS, "Final token: 'x'.")
    assert ids == prompt + target and mask == [0] * len(prompt) + [1] * len(target)
    assert target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(target[:-1]).endswith(PROMPTS.av_answer_close)
    assert prompt.count(marker.token_id) == 1 and len(columns["nla_vector"][0]) == 576


@pytest.mark.slow
def test_load_av_generates_with_prefill_injection_only(trained, data):
    _, root, _, _ = trained
    av = load_av(root / "av", device="cpu", layer=20)
    vectors = torch.tensor(np.stack(data[2].vector.to_numpy()[:3]))
    first = av.generate(vectors, max_new_tokens=6, batch_size=2)
    assert av.injector.n_injections == 2  # two batches, one prefill each; decode steps inject nothing
    assert len(first) == 3 and all(1 <= len(e.token_ids) <= 6 for e in first)
    assert all(isinstance(e.text, str) and "<explanation>" not in e.text for e in first)
    assert [e.token_ids for e in av.generate(vectors, max_new_tokens=6, batch_size=3)] == [e.token_ids for e in first]
    with pytest.raises(NLAError, match="shape"):
        av.generate(vectors[:, :100], max_new_tokens=2)


@pytest.mark.slow
def test_completion_log_probs_match_generation_and_carry_gradients(trained, data):
    _, root, _, _ = trained
    av = load_av(root / "av", device="cpu", trainable=True)
    vectors = torch.tensor(np.stack(data[2].vector.to_numpy()[:2]))
    prompt = torch.tensor([av.prompt_ids] * 2)
    with torch.no_grad(), av.injector.bound(vectors):
        out = av.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    gen = out.sequences[:, prompt.shape[1] :]
    expected = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, gen[..., None]).squeeze(-1)
    completions = [gen[0].tolist(), gen[1, :2].tolist()]  # ragged: the second is right-padded
    logp, mask = av.completion_log_probs(vectors, completions)
    assert logp.shape == mask.shape == (2, 4) and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    torch.testing.assert_close(logp[0], expected[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(logp[1, :2], expected[1, :2], rtol=1e-3, atol=1e-3)
    assert (logp[1, 2:] == 0).all()
    # Swapping the vectors changes the log-probs: the injection is in this pass too.
    swapped, _ = av.completion_log_probs(vectors.flip(0), completions)
    assert not torch.allclose(swapped[0], logp[0])
    (-logp.sum()).backward()
    grads = [p.grad for n, p in av.model.named_parameters() if "lora_" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(d_model=577), "d_model"),
        (lambda m: m["marker"].update(token_id=m["marker"]["token_id"] + 1), "marker token_id"),
        (lambda m: m["marker"].update(left_id=0), "marker left_id"),
        (lambda m: m.update(base_model_fingerprint="gguf:other:0"), "resolves to"),
        (lambda m: m.update(role="ar"), "not an AV"),
    ],
)
def test_load_av_refuses_a_sidecar_that_disagrees(trained, tmp_path, edit, message):
    _, root, _, _ = trained
    ckpt = tmp_path / "av"
    shutil.copytree(root / "av", ckpt, ignore=shutil.ignore_patterns("merged"))
    meta = yaml.safe_load((ckpt / "nla_meta.yaml").read_text())
    edit(meta)
    (ckpt / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    with pytest.raises(NLAError, match=message):
        load_av(ckpt, device="cpu")


@pytest.mark.slow
def test_load_av_refuses_activations_of_another_layer(trained):
    with pytest.raises(NLAError, match="layer"):
        load_av(trained[1] / "av", device="cpu", layer=12)


def test_bf16_autocast_training_steps_still_learn():
    """The project's mixed-precision region keeps learning across optimizer steps. A plain
    `torch.autocast` region around several steps caches the bf16 copies of the weights at the
    first step and silently trains nothing; `nla.models.autocast` turns that cache off."""
    from conftest import tiny_model

    from nla.models import autocast

    def losses(cache_enabled: bool) -> list[float]:
        model = tiny_model("llama").train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ids = torch.randint(5, 500, (4, 24), generator=torch.Generator().manual_seed(0))
        out = []
        region = (
            autocast(torch.device("cpu"), torch.bfloat16)
            if not cache_enabled
            else torch.autocast("cpu", dtype=torch.bfloat16)
        )
        with region:
            for _ in range(12):
                loss = model(input_ids=ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                out.append(float(loss))
        return out

    ours = losses(cache_enabled=False)
    assert ours[-1] < ours[0] - 0.5  # it learns
    cached = losses(cache_enabled=True)
    assert abs(cached[-1] - cached[0]) < abs(ours[-1] - ours[0]) / 2  # the cached region does not (why it exists)


def test_completion_loss_equals_the_full_logits_loss_and_its_gradient():
    """The AV-SFT loss runs the LM head on the completion positions only; it must be the mean next-token
    NLL of the completion tokens over the full logits, gradient included, with ragged completions."""
    from conftest import tiny_model

    from nla.av_sft import completion_loss

    model = tiny_model("llama").train()
    ids = torch.randint(5, 500, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    attention = torch.ones_like(ids)
    for row, (first, end) in enumerate([(12, 20), (12, 17), (14, 19)]):  # prompt, completion, right padding
        labels[row, first:end] = ids[row, first:end]
        attention[row, end:] = 0
    inputs = {"input_ids": ids, "attention_mask": attention, "labels": labels}

    loss, correct, n_valid = completion_loss(model, inputs, None)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # position t predicts t + 1
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())  # mean over targets
    full.backward()

    assert int(n_valid) == 8 + 5 + 5
    assert float(loss) == pytest.approx(float(full), rel=1e-5)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ours, model.parameters(), strict=True))
    hits = ((logits.argmax(-1) == labels[:, 1:]) & (labels[:, 1:] != -100)).sum()
    assert int(correct) == int(hits)
    # Accumulated steps divide by the tokens of the whole step, as TRL does.
    assert float(completion_loss(model, inputs, 36)[0]) == pytest.approx(float(full) / 2, rel=1e-5)
