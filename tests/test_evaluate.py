"""The metric on known vectors, and the evaluate stage end to end on a tiny real run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from embedded_pipeline import SETTINGS, shared_run

from nla.config import NLAConfig
from nla.errors import NLAError
from nla.evaluate import HEADLINE, position_bucket, run_evaluate
from nla.metrics import cosine, derangement, fve_denominator, fve_nrm, mse_nrm, unit


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    return shared_run(tmp_path_factory)


def test_mse_nrm_on_known_vectors():
    e = torch.eye(4)
    assert mse_nrm(e[:1], e[:1]).item() == pytest.approx(0.0)
    assert mse_nrm(e[:1], e[1:2]).item() == pytest.approx(2.0)  # orthogonal
    assert mse_nrm(e[:1], -e[:1]).item() == pytest.approx(4.0)  # opposite
    assert mse_nrm(7.0 * e[:1], 0.1 * e[:1]).item() == pytest.approx(0.0)  # scale does not matter
    v = torch.randn(16, 8)
    w = torch.randn(16, 8)
    torch.testing.assert_close(mse_nrm(v, w), 2 * (1 - cosine(v, w)))
    assert mse_nrm(v, w).shape == (16,)


def test_fve_identical_is_one_mean_is_zero():
    torch.manual_seed(0)
    train = torch.randn(50, 8) + 2.0
    target = torch.randn(20, 8) + 2.0
    mean_unit = unit(train).mean(0)
    assert fve_nrm(3.0 * target, target, mean_unit) == pytest.approx(1.0)
    # Predicting ū itself (the predict-the-mean baseline, not renormalised) explains nothing.
    assert fve_nrm(mean_unit.expand(20, -1), target, mean_unit, normalize_pred=False) == pytest.approx(0.0, abs=1e-6)
    denom = fve_denominator(target, mean_unit)
    assert denom == pytest.approx(float(((unit(target) - mean_unit) ** 2).sum(1).mean()))
    # Orthogonal predictions: mse 2 everywhere, so FVE = 1 - 2/denominator.
    e = torch.eye(2)
    assert fve_nrm(e[[1, 0]], e, torch.zeros(2)) == pytest.approx(1 - 2 / 1)


def test_derangement_moves_every_row():
    for n in (2, 3, 10, 101):
        partner = derangement(n, seed=n)
        assert sorted(partner.tolist()) == list(range(n))
        assert all(partner[i] != i for i in range(n))


def test_position_buckets():
    assert [position_bucket(p) for p in (0, 7, 8, 15, 16, 100)] == [
        (0, 8),
        (0, 8),
        (8, 16),
        (8, 16),
        (16, 32),
        (64, 128),
    ]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(NLAError, match="ar_sft"):
        run_evaluate(
            NLAConfig(),
            tmp_path,
            tmp_path,
            tmp_path,
            {"av_sft": tmp_path},
            tmp_path / "m.json",
            tmp_path,
            tmp_path / "s.md",
        )
    with pytest.raises(NLAError, match="both av_rl and ar_rl"):
        run_evaluate(
            NLAConfig(),
            tmp_path,
            tmp_path,
            tmp_path,
            {"av_sft": tmp_path, "ar_sft": tmp_path, "av_rl": tmp_path},
            tmp_path / "m.json",
            tmp_path,
            tmp_path / "s.md",
        )


@pytest.mark.slow
def test_evaluate_writes_every_metric_plot_and_sample(embedded_run, tmp_path):
    run = embedded_run
    cfg = NLAConfig.model_validate(SETTINGS)
    # The SFT pair stands in for an RL pair too, so the optional RL path runs.
    checkpoints = {"av_sft": run["av"], "ar_sft": run["ar"], "av_rl": run["av"], "ar_rl": run["ar"]}
    metrics = run_evaluate(
        cfg,
        run["act"],
        run["split"],
        run["labels"],
        checkpoints,
        tmp_path / "metrics" / "eval.json",
        tmp_path / "plots",
        tmp_path / "samples.md",
        rows_path=tmp_path / "rows.jsonl",
    )
    saved = json.loads((tmp_path / "metrics" / "eval_details.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["n_rows"] and {r["set"] for r in rows} == {"eval"}
    deviation = np.mean([r["deviation"] for r in rows])
    for series in ("ar_gold", "roundtrip_sft", "final_only", "no_context"):  # the rows give back every mean
        fve = 1 - np.mean([r["mse_nrm"][series] for r in rows]) / deviation
        assert fve == pytest.approx(metrics[f"fve_{series}"], abs=1e-4), series
    assert set(rows[0]["explanations"]) == {"sft", "untrained", "rl"}
    assert saved == pytest.approx(metrics)
    headline = json.loads((tmp_path / "metrics" / "eval.json").read_text())  # what `dvc metrics show` lists
    # The headline holds what was measured: this corpus has no foreign set, so no `_foreign` keys.
    assert headline == pytest.approx({short: metrics[key] for short, key in HEADLINE.items() if key in metrics})
    assert set(headline) == {"fve_rl", "fve_sft"}
    assert not [k for k in saved if "seconds" in k]  # timings go to the provenance file
    assert "eval_seconds" in json.loads((tmp_path / "metrics" / "eval_provenance.json").read_text())
    for key in (
        "fve_ar_gold",
        "fve_roundtrip_sft",
        "fve_roundtrip_rl",
        "fve_ar_gold_rl",
        "fve_shuffled",
        "fve_empty",
        "fve_mean",
        "cos_ar_gold",
        "cos_roundtrip_sft",
        "fve_const",
        "fve_copy",
        "fve_final_only",
        "fve_no_context",
        "gain_roundtrip_rl_vs_final_only",
        "gain_roundtrip_rl_vs_final_only_lo",
        "token_match_sft",
        "fve_untrained",
        "fve_roundtrip_rl_lo",
        "fve_roundtrip_rl_hi",
        "distinct_sft",
        "feature1_distinct_sft",
        "feature1_recall_rl",
        "in_context_sft",
        "top_share_rl",
        "expl_sft_tokens_mean",
        "expl_sft_tokens_median",
        "expl_sft_tokens_max",
        "expl_sft_closed_frac",
        "gold_tokens_mean",
        "n_rows",
    ):
        assert key in metrics, key
    assert 2 <= metrics["n_rows"] <= cfg.evaluate.max_rows
    assert metrics["fve_mean"] == pytest.approx(0.0, abs=1e-6)
    for key in [k for k in metrics if k.startswith("fve_") and k + "_lo" in metrics]:
        assert metrics[key + "_lo"] - 1e-9 <= metrics[key] <= metrics[key + "_hi"] + 1e-9, key
    assert not any(k.endswith("_foreign") for k in metrics)  # this corpus has no foreign documents
    # Same checkpoints, greedy decoding: the "RL" numbers reproduce the SFT ones exactly.
    assert metrics["fve_roundtrip_rl"] == pytest.approx(metrics["fve_roundtrip_sft"], abs=1e-5)
    assert metrics["fve_ar_gold_rl"] == pytest.approx(metrics["fve_ar_gold"], abs=1e-5)
    assert metrics["expl_sft_tokens_max"] <= cfg.evaluate.max_new_tokens
    assert all(-1 <= metrics[k] <= 1 for k in metrics if k.startswith("cos_"))

    by_ckpt = pd.read_csv(tmp_path / "plots" / "fve_by_checkpoint.csv")
    assert {"ar_gold", "roundtrip_sft", "roundtrip_rl", "shuffled", "empty", "mean"} <= set(by_ckpt.checkpoint)
    assert by_ckpt.set_index("checkpoint").fve["ar_gold"] == pytest.approx(metrics["fve_ar_gold"], abs=1e-5)
    by_pos = pd.read_csv(tmp_path / "plots" / "fve_by_position.csv")
    assert {"position_bucket", "bucket_label", "n_rows", "fve", "fve_ar_gold", "fve_roundtrip_sft"} <= set(
        by_pos.columns
    )
    assert (by_pos.fve == by_pos.fve_roundtrip_rl).all()  # `fve` is the last pair's round trip
    assert by_pos.n_rows.sum() == metrics["n_rows"]

    samples = (tmp_path / "samples.md").read_text()
    assert samples.count("\n## doc-") == min(cfg.evaluate.n_samples, metrics["n_rows"])  # no foreign set here
    assert "## Collapse diagnostics" in samples and "| roundtrip_sft |" in samples
    assert "| eval | sft, token named |" in samples or "| eval | sft, token missed |" in samples
    assert "**gold label**" in samples and "**AV sft**" in samples and "round-trip FVE" in samples


@pytest.mark.slow
def test_evaluate_scores_the_foreign_set_with_the_same_controls(embedded_run, tmp_path):
    """Documents in the `foreign` split get every series under a `_foreign` key, with their own rows."""
    from nla.data import SPLITS_FILE
    from nla.io import read_table, write_table

    run = embedded_run
    splits = read_table(run["split"] / SPLITS_FILE)
    eval_docs = sorted(splits[splits.split == "eval"].doc_id.unique())
    splits.loc[splits.doc_id.isin(eval_docs[: len(eval_docs) // 2]), "split"] = "foreign"
    split_dir = tmp_path / "split"
    write_table(split_dir / SPLITS_FILE, splits)
    cfg = NLAConfig.model_validate(SETTINGS)
    metrics = run_evaluate(
        cfg,
        run["act"],
        split_dir,
        run["labels"],
        {"av_sft": run["av"], "ar_sft": run["ar"]},
        tmp_path / "eval.json",
        tmp_path / "plots",
        tmp_path / "samples.md",
    )
    for name in ("ar_gold", "roundtrip_sft", "copy", "final_only", "untrained", "const", "shuffled"):
        assert f"fve_{name}_foreign" in metrics and f"fve_{name}_foreign_lo" in metrics
    assert metrics["n_docs_foreign"] == len(eval_docs) // 2
    assert metrics["n_docs"] == len(eval_docs) - len(eval_docs) // 2
    assert metrics["fve_mean_foreign"] == pytest.approx(0.0, abs=1e-6)
    assert "foreign FVE" in (tmp_path / "samples.md").read_text()


def test_no_context_keeps_the_models_lines_and_token_match_compares_the_final_one():
    """The no_context control drops exactly the lines read off the text; the final feature names the token."""
    from nla.evaluate import final_line, named_token, no_context

    grounded = 'Before: "the army".\nNext likely: "on", "at", ".".\nFinal token "fired".'
    baseline = 'Topic: war.\nFinal token: "fired" (word).'
    assert no_context([grounded, baseline]) == [
        'Next likely: "on", "at", ".".\nFinal token "fired".',
        'Final token: "fired" (word).',
    ]
    assert final_line([grounded]) == ['Final token "fired".']
    assert named_token(grounded) == named_token(baseline) == '"fired"'
    assert named_token('Final token "say \\"hi\\"".') == '"say \\"hi\\""'  # escaped quotes
    assert named_token('Topic: war.\nBefore: "the".') is None  # no final-token feature: nothing named
    assert no_context(["free prose"]) == ["free prose"]


def test_bootstrap_interval_resamples_documents():
    from nla.metrics import bootstrap_fve

    rng = np.random.default_rng(0)
    dev = np.ones(40)
    tight = bootstrap_fve(np.full(40, 0.5), dev, np.repeat(np.arange(10), 4))
    assert tight == pytest.approx((0.5, 0.5, 0.5))  # every document alike: no spread
    mse = rng.uniform(0, 1, 40)
    fve, lo, hi = bootstrap_fve(mse, dev, np.repeat(np.arange(10), 4))
    assert lo < fve < hi and fve == pytest.approx(1 - mse.mean())
    # Rows of one document alike, documents apart: resampling documents (10 of them) must give a wider
    # interval than pretending the 40 rows were independent.
    per_doc = np.repeat(rng.uniform(0, 1, 10), 4)
    _, lo_docs, hi_docs = bootstrap_fve(per_doc, dev, np.repeat(np.arange(10), 4))
    _, lo_rows, hi_rows = bootstrap_fve(per_doc, dev, np.arange(40))
    assert hi_docs - lo_docs > 1.5 * (hi_rows - lo_rows)


def test_paired_gain_is_the_fve_difference_with_a_narrower_interval_than_either_fve():
    """Rows that vary a lot from document to document, a series better than its control by a steady 0.05:
    the paired interval of the gain is tight and excludes 0, while the two FVEs' own intervals overlap."""
    from nla.metrics import bootstrap_fve, bootstrap_gain

    rng = np.random.default_rng(1)
    docs, dev = np.repeat(np.arange(30), 3), np.ones(90)
    control = np.repeat(rng.uniform(0.3, 1.0, 30), 3)
    series = control - 0.05 + rng.normal(0, 0.01, 90)
    gain, lo, hi = bootstrap_gain(series, control, dev, docs)
    (fve_a, lo_a, _), (fve_b, _, hi_b) = bootstrap_fve(series, dev, docs), bootstrap_fve(control, dev, docs)
    assert gain == pytest.approx(fve_a - fve_b) and lo < gain < hi
    assert lo > 0 and lo_a < hi_b  # the gain is clear, though the FVEs' intervals overlap
    assert bootstrap_gain(control, control, dev, docs) == pytest.approx((0.0, 0.0, 0.0))


def test_feature_stats_pair_lines_last_with_last_and_catch_a_collapsed_topic():
    from nla.evaluate import feature_stats, features_of

    gold = [
        'Topic: cats, milk.\nBefore: "the cat drank".\nFinal token "milk"; next likely: "and", ".".',
        'Topic: rain, roads.\nBefore: "the roads were".\nFinal token "wet"; next likely: "and", "after".',
    ]
    # One line per feature or all on one line read alike; the topic line is the same on both rows.
    av = [
        'Topic: country, people. Before: "the cat drank". Final token "milk"; next likely: "and", "and".',
        'Topic: country, people.\nFinal token "wet"; next likely: "after".',
    ]
    assert features_of(av[0])[1] == 'Before: "the cat drank".'
    stats = feature_stats(av, gold)
    assert stats["feature1_distinct"] == 0.5 and stats["feature1_recall"] == 0.0
    # The second AV text has no middle line: it scores nothing there, and its last line still pairs
    # with the gold's final-token line.
    assert stats["feature2_recall"] == pytest.approx((1.0 + 0.0) / 2)
    assert stats["feature3_recall"] == pytest.approx((3 / 3 + 2 / 3) / 2)
    assert stats["feature3_distinct"] == 1.0


def test_collapse_stats_count_distinct_texts_and_context_words():
    from nla.evaluate import collapse_stats

    stats, top = collapse_stats(["Topic: cats.", "Topic: cats.", "Topic: dogs bark."], ["the cats", "cats", "a dog"])
    assert top == "Topic: cats."
    assert stats["distinct"] == pytest.approx(2 / 3) and stats["top_share"] == pytest.approx(2 / 3)
    assert stats["in_context"] == pytest.approx(2 / 4)  # cats, cats found; dogs, bark not
