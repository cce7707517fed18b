"""`nla upload`: the one way published folders reach the Hugging Face Hub, and only on improvement.

`nla publish` (a DVC stage) only builds the folders under `data/publish`; nothing inside
`dvc repro` uploads. Uploading is this separate step, run by `nla upload` and by the Prefect
flow's upload task (`python -m flows.pipeline --publish`). It compares the key metric
(`KEY_METRICS`: the first one present in `metrics/eval.json`) with the value recorded at the
last upload (`reports/published_metrics.json`), uploads one Hub repo per folder only when it is
higher (or when forced), then records the new metrics there; commit that file so the next run
compares against it.

The token is read from the environment variable named by `publish.token_env`, handed to
`HfApi` and never written anywhere. This module needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from nla.config import NLAConfig
from nla.errors import NLAError
from nla.interop import read_meta
from nla.io import write_json
from nla.sidecar import SIDECAR_NAME

ROLES = ("av", "ar")
SUMMARY_NAME = "publish.json"  # written by `nla publish` beside the folders: the repo each card names
HUB_IDS = {"embedded": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # Hub id to cite for a local alias
# Of metrics/eval.json; the first one present decides "improved": the round trip on text no stage trained on first.
KEY_METRICS = ("fve_rl_foreign", "fve_sft_foreign", "fve_rl", "fve_sft")


# ----------------------------------------------------------------------------- naming


def hub_base_model(name: str) -> str | None:
    """The Hub id to cite as base_model: aliases mapped, `owner/name` ids kept, local paths dropped."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def repo_name(cfg: NLAConfig, meta: dict[str, Any], role: str) -> str:
    """e.g. nla-smollm2-135m-instruct-l20-av (namespace added at upload)."""
    base = (hub_base_model(meta["base_model"]) or Path(meta["base_model"]).stem).split("/")[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", f"{cfg.publish.repo_prefix}-{base}-l{meta['layer']}-{role}".lower())


# ----------------------------------------------------------------------------- the gate


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a metrics file under dotted keys, as `dvc metrics show` names them."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def key_metric(flat: dict[str, float]) -> str | None:
    """The first of KEY_METRICS present (matched on the last dotted component)."""
    for name in KEY_METRICS:
        for key in flat:
            if key == name or key.endswith("." + name):
                return key
    return None


def improvement(new: dict[str, Any], old: dict[str, Any] | None) -> tuple[bool, str]:
    """(improved?, why): higher key metric is better; no published baseline counts as improved."""
    new_flat = flatten(new)
    key = key_metric(new_flat)
    if key is None:
        return False, f"no key metric ({' or '.join(KEY_METRICS)}) in the new metrics"
    if old is None:
        return True, f"{key} = {new_flat[key]:.4f}; nothing published yet"
    old_value = flatten(old).get(key)
    if old_value is None:
        return True, f"{key} = {new_flat[key]:.4f}; the published metrics lack it"
    verdict = "improved" if new_flat[key] > old_value else "did not improve"
    return new_flat[key] > old_value, f"{key} {verdict}: {old_value:.4f} -> {new_flat[key]:.4f}"


# ----------------------------------------------------------------------------- upload


def published_folders(out_dir: str | Path) -> dict[str, Path]:
    """{role: folder} of a publish output directory."""
    out_dir = Path(out_dir)
    folders = {role: out_dir / role for role in ROLES if (out_dir / role / SIDECAR_NAME).is_file()}
    if not folders:
        raise NLAError(f"{out_dir} holds no published model folders; run the publish stage first (`nla publish`)")
    return folders


def upload_folders(cfg: NLAConfig, folders: dict[str, Path]) -> dict[str, str]:
    """Create (if needed) and upload one Hub repo per folder; returns {role: commit url}."""
    token = os.environ.get(cfg.publish.token_env, "").strip()
    if not token:
        raise NLAError(
            f"uploading needs a Hub token in the environment variable {cfg.publish.token_env}; "
            "export it (never write it into params.yaml)"
        )
    if not cfg.publish.namespace:
        raise NLAError(
            "uploading needs publish.namespace (your Hub user or organisation) so the model cards name "
            "the right repo; set it in params.yaml and rerun the publish stage"
        )
    repos = {role: f"{cfg.publish.namespace}/{repo_name(cfg, read_meta(f), role)}" for role, f in folders.items()}
    for role, folder in folders.items():
        summary = folder.parent / SUMMARY_NAME
        built_for = (
            json.loads(summary.read_text(encoding="utf-8"))["models"][role]["repo_id"] if summary.is_file() else None
        )
        if built_for not in (None, repos[role]):
            raise NLAError(
                f"{folder} was built for {built_for}, not {repos[role]}; rerun `dvc repro publish` "
                "so its model card names the repo it goes to"
            )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    urls = {}
    for role, folder in folders.items():
        api.create_repo(repos[role], repo_type="model", private=cfg.publish.private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repos[role],
            repo_type="model",
            folder_path=str(folder),
            commit_message=f"nla publish: {role} layer {read_meta(folder)['layer']}",
        )
        urls[role] = str(getattr(info, "commit_url", info))
    return urls


def run_upload(
    cfg: NLAConfig,
    publish_dir: str | Path,
    metrics_path: str | Path,
    published_path: str | Path,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Upload the folders of `publish_dir` when the key metric beat the last upload (or `force`).

    Returns {"improved", "verdict", "uploaded": {role: url}}; after an upload, `published_path`
    holds the metrics that were uploaded.
    """
    metrics_path, published_path = Path(metrics_path), Path(published_path)
    if not metrics_path.is_file():
        raise NLAError(f"{metrics_path} not found; run the pipeline (`dvc repro`) before uploading")
    new = json.loads(metrics_path.read_text(encoding="utf-8"))
    old = json.loads(published_path.read_text(encoding="utf-8")) if published_path.is_file() else None
    improved, verdict = improvement(new, old)
    if not (improved or force):
        return {"improved": False, "verdict": verdict, "uploaded": {}}
    uploaded = upload_folders(cfg, published_folders(publish_dir))
    write_json(published_path, new)
    return {"improved": improved, "verdict": verdict, "uploaded": uploaded}
