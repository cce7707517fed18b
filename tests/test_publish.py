"""The publish stage on real (tiny) AV and AR checkpoints of the embedded model.

The checkpoints come from the real stages (corpus → extract → split → av_sft / ar_sft) on a
few documents with one training step each; only the warm-start labels are written by hand.
The Hub cannot be reached from these machines, so the upload tests replace
`HfApi.create_repo` / `HfApi.upload_folder` with a local stand-in that records its calls.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from nla.config import config_from_dict
from nla.errors import NLAError
from nla.publish import ROLES, run_publish
from nla.upload import published_folders, run_upload, upload_folders

TOKEN = "hf_TESTtoken_never_written_0123456789abcdef"
METRICS = {
    "fve_sft": 0.21,
    "fve_rl": 0.33,
    "fve_gold": 0.4,
    "controls": {"fve_shuffled": -0.3},
    "rows": 16,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(cfg, root) with real one-step AV and AR checkpoints under root/av and root/ar."""
    from nla.ar_sft import run_ar_sft
    from nla.av_sft import run_av_sft
    from nla.corpus import run_corpus
    from nla.data import load_rows
    from nla.extract import run_extract, run_split
    from nla.io import write_table

    root = tmp_path_factory.mktemp("publish")
    lora = {"r": 4, "alpha": 8}
    cfg = config_from_dict(
        {
            "corpus": {"max_docs": 12, "foreign": {}},
            "extract": {"max_tokens": 24, "positions_per_doc": 2, "min_position": 4},
            "av_sft": {"max_steps": 2, "batch_size": 2, "lora": lora},  # step 1 runs at lr 0 (warm-up)
            "ar_sft": {"max_steps": 1, "batch_size": 2, "lora": lora, "av_explanations": 2, "av_max_new_tokens": 8},
            "publish": {"namespace": "nla-test", "token_env": "NLA_TEST_HF_TOKEN"},
        }
    )
    run_corpus(cfg.corpus, root / "documents.parquet")
    run_extract(cfg, root / "documents.parquet", root / "act", root / "work")
    run_split(cfg, root / "act", root / "split")
    rows = load_rows(root / "act", root / "split")
    explanations = [
        f"News text; the last token is '{t.strip()}'. The next word continues the sentence." for t in rows.token
    ]
    write_table(
        root / "labels" / "explanations.parquet", pd.DataFrame({"row_id": rows.row_id, "explanation": explanations})
    )
    run_av_sft(cfg, root / "act", root / "split", root / "labels", root / "av", work_dir=root / "work_av")
    run_ar_sft(cfg, root / "act", root / "split", root / "labels", root / "ar", av_dir=root / "av")
    (root / "eval.json").write_text(json.dumps(METRICS))
    return cfg, root


@pytest.mark.slow
def test_published_folders_load_back_and_explain_the_same(trained, monkeypatch):
    from huggingface_hub import ModelCard

    cfg, root = trained
    monkeypatch.setenv("NLA_TEST_HF_TOKEN", TOKEN)  # present, but dry run: must not be written or used
    summary = run_publish(cfg, {"av": root / "av", "ar": root / "ar"}, root / "eval.json", root / "pub")
    assert "uploaded" not in summary  # publishing builds folders; only `nla upload` uploads
    assert summary["models"]["av"]["weights"] == summary["models"]["ar"]["weights"] == "merged"  # both LoRAs
    assert "model.safetensors" in summary["models"]["av"]["files"]
    assert {"backbone.safetensors", "config.json", "head.safetensors", "mean_unit.safetensors"} <= set(
        summary["models"]["ar"]["files"]
    )
    assert not {"adapter_model.safetensors", "adapter_config.json"} & set(summary["models"]["ar"]["files"])

    def nla_explain(av: Path) -> list[dict]:  # the user's path: `nla explain --model <folder>`
        cmd = [
            str(Path(sys.executable).parent / "nla"),
            "explain",
            "The cat sat on the mat and looked out of the",
            "--position",
            "-1",
            "--position",
            "-3",
            "--model",
            str(av),
            "--max-new-tokens",
            "16",
            "--json",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    before, after = nla_explain(root / "av"), nla_explain(root / "pub" / "av")
    assert len(before) == 2 and all(r["explanation"] for r in before)
    assert [r["explanation"] for r in after] == [r["explanation"] for r in before]
    for name in ("head.safetensors", "mean_unit.safetensors"):  # the AR's head and reference ship as trained
        assert (root / "pub" / "ar" / name).read_bytes() == (root / "ar" / name).read_bytes()

    for role in ROLES:
        card = ModelCard.load(root / "pub" / role / "README.md")
        assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert card.data.nla["layer"] == 20 and card.data.nla["role"] == role
        assert f"activation-{'verbalizer' if role == 'av' else 'reconstructor'}" in card.data.tags
        results = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert results == {
            "fve_sft": 0.21,
            "fve_rl": 0.33,
            "fve_gold": 0.4,
            "controls.fve_shuffled": -0.3,
        }
        assert card.data.model_name == f"nla-smollm2-135m-instruct-l20-{role}"
        assert card.data.nla["weights"] == "merged" and card.data.nla["base_weights"].startswith("gguf:")
        assert "dequantised GGUF" in card.text and "differ from the Hub's" in card.text  # which weights, said
    assert ModelCard.load(root / "pub" / "av" / "README.md").data.nla["injection"]["mode"] == "replace"
    assert ModelCard.load(root / "pub" / "av" / "README.md").data.library_name == "transformers"

    written = [p for p in (root / "pub").rglob("*") if p.is_file()]
    assert written and not [p for p in written if TOKEN.encode() in p.read_bytes()]


@pytest.mark.slow
def test_model_card_usage_code_runs(trained, monkeypatch, capsys):
    """The card's Python block, run as written; `snapshot_download` (Hub) returns the published folder."""
    import huggingface_hub

    cfg, root = trained
    if not (root / "pub" / "av").is_dir():
        run_publish(cfg, {"av": root / "av", "ar": root / "ar"}, root / "eval.json", root / "pub")
    for role in ROLES:
        folder = root / "pub" / role
        monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, folder=folder: str(folder))
        code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
        exec(compile(code, f"{role}/README.md", "exec"), {})
        printed = capsys.readouterr().out.strip()
        assert printed and (role == "av" or printed == "torch.Size([1, 576])")


@pytest.mark.slow
def test_upload_goes_through_hf_api_with_the_env_token_only(trained, monkeypatch):
    """Local stand-in for the Hub: HfApi.create_repo / upload_folder record what they were called with."""
    from huggingface_hub import HfApi

    cfg, root = trained
    if not (root / "pub" / "av").is_dir():
        run_publish(cfg, {"av": root / "av", "ar": root / "ar"}, root / "eval.json", root / "pub")
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", self.token, kw)) or "url")

    monkeypatch.delenv("NLA_TEST_HF_TOKEN", raising=False)
    with pytest.raises(NLAError, match="NLA_TEST_HF_TOKEN"):
        upload_folders(cfg, published_folders(root / "pub"))
    no_namespace = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"namespace": None})})
    monkeypatch.setenv("NLA_TEST_HF_TOKEN", TOKEN)
    with pytest.raises(NLAError, match="publish.namespace"):
        upload_folders(no_namespace, published_folders(root / "pub"))
    assert calls == []

    urls = upload_folders(cfg, published_folders(root / "pub"))
    assert set(urls) == {"av", "ar"}
    creates = [c for c in calls if c[0] == "create"]
    uploads = [c for c in calls if c[0] == "upload"]
    assert [c[1] for c in creates] == [
        "nla-test/nla-smollm2-135m-instruct-l20-av",
        "nla-test/nla-smollm2-135m-instruct-l20-ar",
    ]
    assert all(c[2]["private"] is True and c[2]["exist_ok"] for c in creates)
    assert [(c[1], c[2]["repo_id"], Path(c[2]["folder_path"])) for c in uploads] == [
        (TOKEN, "nla-test/nla-smollm2-135m-instruct-l20-av", root / "pub" / "av"),
        (TOKEN, "nla-test/nla-smollm2-135m-instruct-l20-ar", root / "pub" / "ar"),
    ]
    sidecar = yaml.safe_load((root / "pub" / "av" / "nla_meta.yaml").read_text())
    assert sidecar["weights"] == "full" and sidecar["merged_from"] == "adapter"

    # The one upload switch: `nla upload` (run_upload) uploads only when the key metric beat the last upload.
    calls.clear()
    published = root / "published_metrics.json"
    first = run_upload(cfg, root / "pub", root / "eval.json", published)
    assert first["improved"] and set(first["uploaded"]) == {"av", "ar"} and len(calls) == 4
    assert json.loads(published.read_text()) == METRICS  # the new baseline
    calls.clear()
    again = run_upload(cfg, root / "pub", root / "eval.json", published)
    assert not again["improved"] and again["uploaded"] == {} and calls == []
    assert again["verdict"] == "fve_rl did not improve: 0.3300 -> 0.3300"
    assert set(run_upload(cfg, root / "pub", root / "eval.json", published, force=True)["uploaded"]) == {"av", "ar"}
    other = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"namespace": "someone-else"})})
    with pytest.raises(NLAError, match="was built for nla-test/.*rerun `dvc repro publish`"):
        upload_folders(other, published_folders(root / "pub"))  # the cards would name another repo


PLAIN_AV = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
assert not [m for m in sys.modules if m.split(".")[0] == "nla"]
"""
PLAIN_AR = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel
folder = sys.argv[1]
model = AutoModel.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
model.norm = torch.nn.Identity()  # the AR reads the output of block K itself
model.load_state_dict(load_file(folder + "/backbone.safetensors"))
head = load_file(folder + "/head.safetensors")["weight"]
with torch.no_grad():
    torch.save(model.eval()(torch.load(sys.argv[2])).last_hidden_state[:, -1] @ head.T, sys.argv[3])
assert not [m for m in sys.modules if m.split(".")[0] == "nla"]
"""


@pytest.mark.slow
def test_published_weights_load_without_nla_and_are_the_trained_ones(trained, tmp_path):
    """Plain transformers (a subprocess that never imports nla) on the published folders gives the logits and
    reconstructions of nla's loaders on the trained checkpoints: base weights of the dequantised GGUF, LoRA merged.
    The AV's vector injection is nla's (left out here: no marker in the text)."""
    import torch

    from nla.ar import load_ar
    from nla.av import load_av

    cfg, root = trained
    if not (root / "pub" / "av").is_dir():
        run_publish(cfg, {"av": root / "av", "ar": root / "ar"}, root / "eval.json", root / "pub")

    def plain(script: str, folder: Path, ids: torch.Tensor) -> torch.Tensor:
        torch.save(ids, tmp_path / "ids.pt")
        proc = subprocess.run(
            [sys.executable, "-c", script, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return torch.load(tmp_path / "out.pt")

    av = load_av(root / "av", "cpu")  # the trained adapter on nla's base weights, merged on load
    ids = av.tokenizer("The cat sat on the mat and looked out of the window", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = av.model(ids).logits
    got = plain(PLAIN_AV, root / "pub" / "av", ids)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    untrained = plain(PLAIN_AV, dequantised_base(), ids)  # positive control: the base itself is measurably off
    off, moved = (got - expected).abs().max(), (got - untrained).abs().max()
    assert moved > 100 * off and moved > 1e-3, (off, moved)

    ar = load_ar(root / "ar", "cpu")  # the trained LoRA AR
    text = "A news report; the next word is a name."
    ids = torch.tensor([ar.prompt_ids(text)])
    got = plain(PLAIN_AR, root / "pub" / "ar", ids)
    assert torch.allclose(got, ar.reconstruct([text]), atol=1e-4), (got - ar.reconstruct([text])).abs().max()


def dequantised_base() -> Path:
    """The dequantised embedded model as nla caches it: the base the adapters were trained on."""
    from nla.models import converted_gguf_dir, resolve_source

    return converted_gguf_dir(resolve_source("embedded"))


def test_publish_rejects_unknown_roles_and_wrong_checkpoints(tmp_path):
    cfg = config_from_dict({})
    with pytest.raises(NLAError, match="unknown model roles"):
        run_publish(cfg, {"sae": tmp_path}, tmp_path / "m.json", tmp_path / "out")
    with pytest.raises(NLAError, match="nla_meta.yaml is missing"):
        run_publish(cfg, {"av": tmp_path}, tmp_path / "m.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_the_old_upload_switch_and_an_upload_before_the_pipeline_are_refused(tmp_path):
    with pytest.raises(NLAError, match="publish.enabled is gone: `nla publish` only builds folders"):
        config_from_dict({"publish": {"enabled": True}})
    with pytest.raises(NLAError, match=r"eval.json not found; run the pipeline \(`dvc repro`\) before uploading"):
        run_upload(config_from_dict({}), tmp_path / "pub", tmp_path / "eval.json", tmp_path / "published.json")
