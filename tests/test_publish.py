"""The publish stage on real (tiny) AV and AR checkpoints of the embedded model.

The checkpoints come from the real stages (corpus → extract → split → av_sft / ar_sft) on a
few documents with one training step each; only the warm-start labels are written by hand.
The Hub cannot be reached from these machines, so the upload test replaces
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
from nla.publish import ROLES, published_folders, run_publish, upload_folders

TOKEN = "hf_TESTtoken_never_written_0123456789abcdef"
METRICS = {
    "fve_roundtrip_sft": 0.21,
    "fve_roundtrip_rl": 0.33,
    "fve_ar_gold": 0.4,
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
            "av_sft": {"max_steps": 1, "batch_size": 2, "lora": lora},
            "ar_sft": {"max_steps": 1, "batch_size": 2, "lora": lora},
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
    run_ar_sft(cfg, root / "act", root / "split", root / "labels", root / "ar")
    (root / "eval.json").write_text(json.dumps(METRICS))
    return cfg, root


@pytest.mark.slow
def test_published_folders_load_back_and_explain_the_same(trained, monkeypatch):
    from huggingface_hub import ModelCard

    cfg, root = trained
    monkeypatch.setenv("NLA_TEST_HF_TOKEN", TOKEN)  # present, but dry run: must not be written or used
    summary = run_publish(cfg, {"av": root / "av", "ar": root / "ar"}, root / "eval.json", root / "pub")
    assert summary["upload"] == "dry run" and "uploaded" not in summary
    assert summary["models"]["av"]["weights"] == "full"  # the LoRA AV was merged
    assert "model.safetensors" in summary["models"]["av"]["files"]
    assert {"adapter_model.safetensors", "head.safetensors", "mean_unit.safetensors"} <= set(
        summary["models"]["ar"]["files"]
    )

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
    for name in ("adapter_model.safetensors", "head.safetensors", "mean_unit.safetensors"):  # the AR ships as trained
        assert (root / "pub" / "ar" / name).read_bytes() == (root / "ar" / name).read_bytes()

    for role in ROLES:
        card = ModelCard.load(root / "pub" / role / "README.md")
        assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert card.data.nla["layer"] == 20 and card.data.nla["role"] == role
        assert f"activation-{'verbalizer' if role == 'av' else 'reconstructor'}" in card.data.tags
        results = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert results == {
            "fve_roundtrip_sft": 0.21,
            "fve_roundtrip_rl": 0.33,
            "fve_ar_gold": 0.4,
            "controls.fve_shuffled": -0.3,
        }
        assert card.data.model_name == f"nla-smollm2-135m-instruct-l20-{role}"
    assert ModelCard.load(root / "pub" / "av" / "README.md").data.nla["injection"]["mode"] == "replace"
    assert ModelCard.load(root / "pub" / "av" / "README.md").data.library_name == "transformers"
    assert ModelCard.load(root / "pub" / "ar" / "README.md").data.library_name == "peft"
    adapter = json.loads((root / "pub" / "ar" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # no local path

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

    enabled = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"enabled": True})})
    monkeypatch.delenv("NLA_TEST_HF_TOKEN", raising=False)
    with pytest.raises(NLAError, match="NLA_TEST_HF_TOKEN"):
        upload_folders(enabled, published_folders(root / "pub"))
    no_namespace = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"namespace": None})})
    monkeypatch.setenv("NLA_TEST_HF_TOKEN", TOKEN)
    with pytest.raises(NLAError, match="publish.namespace"):
        upload_folders(no_namespace, published_folders(root / "pub"))
    assert calls == []

    urls = upload_folders(enabled, published_folders(root / "pub"))
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


def test_publish_rejects_unknown_roles_and_wrong_checkpoints(tmp_path):
    cfg = config_from_dict({})
    with pytest.raises(NLAError, match="unknown model roles"):
        run_publish(cfg, {"sae": tmp_path}, tmp_path / "m.json", tmp_path / "out")
    with pytest.raises(NLAError, match="nla_meta.yaml is missing"):
        run_publish(cfg, {"av": tmp_path}, tmp_path / "m.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
