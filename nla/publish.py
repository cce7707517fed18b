"""The publish stage: one Hub-ready folder per model (AV and AR); it never uploads.

Each folder holds safetensors weights, the tokenizer, the checkpoint's `nla_meta.yaml` and a
model card (README.md) whose YAML header carries base_model, library_name, tags, the layer,
the injection, which weights the folder holds and the eval results (model-index) from the
metrics file. With `publish.merge_weights` (the default) both models ship merged full weights:
the AV as a plain transformers model, the AR as its truncated backbone (`backbone.safetensors`)
with head and ū. Those are the weights that were trained, whatever the base: the embedded
model's adapters were trained on the dequantised Q4_1 GGUF, whose weights differ from the
Hub's `HuggingFaceTB/SmolLM2-135M-Instruct`, so an adapter applied to the Hub weights would
silently give another model. Without merging they ship as adapters, and the card says which
base weights they need. Every folder loads back with `load_av` / `load_ar`.
With ``layout="kitft"`` (`nla publish --format kitft`) the folders are written in the paper's
released layout instead (`nla.interop.write_kitft`: full AV weights, a truncated AR model and
``value_head.safetensors``, a public model sidecar that embeds ours), so the reference clients
can load them too; `NLA.load` reads either.

Uploading is a separate step, `nla upload` (`nla.upload`), taken only when the key metric
improved; the DVC stage builds folders and nothing else.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from nla.ar import load_ar
from nla.av import load_av
from nla.config import NLAConfig
from nla.errors import NLAError
from nla.interop import write_kitft
from nla.io import atomic_dir, atomic_write_text, write_json
from nla.sidecar import read_sidecar, write_sidecar
from nla.upload import ROLES, SUMMARY_NAME, hub_base_model, repo_name

CARD_NAME = "README.md"
TAGS = {"av": "activation-verbalizer", "ar": "activation-reconstructor"}
ROLE_TEXT = {
    "av": "activation verbalizer (AV): reads a residual-stream activation vector injected at a marker token "
    "and writes a natural-language explanation of it",
    "ar": "activation reconstructor (AR): reads an explanation and reconstructs the activation vector it describes",
}
NOT_PUBLISHED = {"merged"}  # av_sft.merge's extra copy: the published AV is merged or an adapter, never both


# ----------------------------------------------------------------------------- metrics


def eval_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The FVE/MSE numbers of the metrics file, flattened to dotted keys (as `dvc metrics show`)."""
    flat: dict[str, float] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{prefix}{key}"] = float(value)

    walk(metrics, "")
    return {k: v for k, v in flat.items() if any(re.match(r"(fve|mse)", part) for part in k.split("."))}


# ----------------------------------------------------------------------------- folders


def _copy_files(src: Path, dest: Path) -> None:
    """The checkpoint's top-level files (weights, tokenizer, sidecar), not its extras."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in NOT_PUBLISHED and not path.name.startswith("."):
            shutil.copy2(path, dest / path.name)


def hub_weights(meta: dict[str, Any]) -> bool:
    """Whether the base weights are the Hub's own: not a dequantised GGUF (the embedded model) nor a local folder."""
    return str(meta.get("base_model_fingerprint", "")).startswith("hf:")


def _name_adapter_base(dest: Path, meta: dict[str, Any]) -> None:
    """PEFT records the base as a local path. A published adapter names the Hub id only when it was
    trained on the Hub's weights; otherwise no base, so PEFT refuses instead of loading other weights."""
    config_path = dest / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = hub_base_model(meta["base_model"]) if hub_weights(meta) else None
        atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")


def export_av(checkpoint: Path, dest: Path, merge: bool) -> dict[str, Any]:
    """Write the AV folder; returns its sidecar. Adapters are merged into full weights when `merge`."""
    meta = read_sidecar(checkpoint)
    if meta.get("role") != "av":
        raise NLAError(f"{checkpoint} holds a {meta.get('role')!r} model, not an AV; pass the AV checkpoint folder")
    if meta.get("weights") == "adapter" and merge:
        meta = {**meta, "merged_from": "adapter"}
        if (checkpoint / "merged").is_dir():  # av_sft.merge already saved merged weights
            _copy_files(checkpoint / "merged", dest)
            meta = {**meta, "weights": "full", "merged": False}
            write_sidecar(dest, meta)
            return meta
        av = load_av(checkpoint)  # an inference load merges the adapter into the weights
        av.injector.remove()  # the hooks are runtime state; the saved weights are plain
        av.save(dest, meta)  # the one AV save: full weights now, so `weights: full`
        return av.meta
    _copy_files(checkpoint, dest)
    _name_adapter_base(dest, meta)
    write_sidecar(dest, meta)
    return meta


def export_ar(checkpoint: Path, dest: Path, merge: bool) -> dict[str, Any]:
    """Write the AR folder (backbone or adapter, head, ū, tokenizer, sidecar); returns its sidecar.

    With `merge`, a LoRA AR ships as its truncated backbone with the adapter merged in
    (`finetune: full`), which `load_ar` reads like a fully fine-tuned one, plus the `config.json`
    of that truncated backbone, so plain transformers can rebuild it (`AutoModel.from_config`,
    the final norm replaced by the identity, then `backbone.safetensors`).
    """
    meta = read_sidecar(checkpoint)
    if meta.get("role") != "ar":
        raise NLAError(f"{checkpoint} holds a {meta.get('role')!r} model, not an AR; pass the AR checkpoint folder")
    if meta.get("finetune") == "lora" and merge:
        ar = load_ar(checkpoint, "cpu")
        ar.backbone = ar.backbone.merge_and_unload()
        ar.save(dest, {"finetune": "full", "merged_from": "lora"})
        config = copy.deepcopy(ar.backbone.config)
        config.num_hidden_layers = blocks = meta.get("blocks_kept", meta["layer"] + 1)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:blocks]
        config.save_pretrained(dest)
        return ar.meta
    _copy_files(checkpoint, dest)
    _name_adapter_base(dest, meta)
    return meta


# ----------------------------------------------------------------------------- model card


def _usage(role: str, repo_id: str, meta: dict[str, Any]) -> str:
    base, layer, d = meta["base_model"], meta["layer"], meta["d_model"]
    if role == "av":
        return f'''```python
from huggingface_hub import snapshot_download
from nla import NLA

nla = NLA.load(av=snapshot_download("{repo_id}"))  # the subject model {base} loads on first use
v = nla.activations(["The cat sat on the mat and looked out of the"])  # block {layer} output, last token: (1, {d})
print(nla.verbalize(v)[0])
```

From the command line: `nla explain --model <downloaded folder> ...` (see `nla explain --help`).'''
    return f'''```python
from huggingface_hub import snapshot_download
from nla.interop import load_any_ar

ar = load_any_ar(snapshot_download("{repo_id}"))  # this project's layout or the released one
v_hat = ar.reconstruct(["A news report about a cricket match; the next word is likely a player's name."])
print(v_hat.shape)  # (1, {d}): the reconstructed output of block {layer} of {base}
```'''


def weights_kind(meta: dict[str, Any]) -> str:
    """'merged', 'adapter' or 'full' (fine-tuned without an adapter)."""
    if meta.get("merged_from"):
        return "merged"
    return "adapter" if meta.get("weights") == "adapter" or meta.get("finetune") == "lora" else "full"


def weights_text(meta: dict[str, Any]) -> str:
    """Which weights the folder holds and which base weights they come from: what a user must load."""
    fingerprint, hub_id = str(meta.get("base_model_fingerprint", "")), hub_base_model(meta["base_model"])
    if fingerprint.startswith("gguf:"):
        base = f"the dequantised GGUF `{fingerprint.split(':')[1]}` (float32, as `nla` loads it)"
        if hub_id:
            base += f", whose weights differ from the Hub's `{hub_id}`"
    elif fingerprint.startswith("hf:"):
        base = f"`{hub_id or meta['base_model']}` from the Hub"
    else:
        base = f"the local model `{meta['base_model']}`"
    kind = weights_kind(meta)
    if kind == "merged":
        return f"merged: the trained weights themselves, the LoRA adapter merged into {base}"
    if kind == "adapter":
        return f"LoRA adapter, trained on {base}: apply it to those weights only"
    return f"fully fine-tuned weights, starting from {base}"


def model_card(role: str, meta: dict[str, Any], repo_id: str, metrics: dict[str, float]):
    """A huggingface_hub ModelCard: YAML metadata (incl. model-index eval results) + prose + usage."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    injection = meta.get("injection") or {}
    results = [
        EvalResult(
            task_type="feature-extraction",
            task_name="NLA activation round trip",
            dataset_type="nla-eval-split",
            dataset_name=f"held-out eval rows (layer {meta['layer']})",
            metric_type=key,
            metric_value=value,
            metric_name=key,
        )
        for key, value in metrics.items()
    ]
    adapter = (meta.get("weights") == "adapter") or (meta.get("finetune") == "lora")
    hub_id = hub_base_model(meta["base_model"])
    subject = (
        f"`{hub_id}` (nla model name `{meta['base_model']}`)"
        if hub_id and hub_id != meta["base_model"]
        else f"`{meta['base_model']}`"
    )
    data = ModelCardData(
        base_model=hub_id,
        library_name="peft" if adapter else "transformers",
        tags=["nla", "natural-language-autoencoder", "interpretability", TAGS[role]],
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
        nla={
            "role": role,
            "layer": meta["layer"],
            "d_model": meta["d_model"],
            "injection": {k: injection.get(k) for k in ("mode", "scale", "karvonen_block") if k in injection} or None,
            "marker": (meta.get("marker") or {}).get("char"),
            "base_model_source": meta["base_model"],
            "base_weights": meta.get("base_model_fingerprint"),
            "weights": weights_kind(meta),
        },
    )
    table = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) or "| (no metrics file) | |"
    foreign = next(
        (metrics[k] for k in ("fve_roundtrip_rl_foreign", "fve_roundtrip_sft_foreign") if k in metrics), None
    )
    headline = (
        f"**Round-trip FVE on foreign text (a corpus no stage trained on): {foreign:+.3f}.**"
        if foreign is not None
        else "No foreign-text evaluation was run (set `corpus.foreign`)."
    )
    injection_text = (
        f"`{injection.get('mode')}`" + (f", scale {injection['scale']:.4g}" if injection.get("scale") else "")
        if role == "av"
        else "n/a (the AR reads text)"
    )
    plain = ""
    if role == "av" and weights_kind(meta) != "adapter":
        plain = (
            " The folder is also a plain transformers model (`AutoModelForCausalLM.from_pretrained(folder)`);"
            " `nla` adds the vector at the marker."
        )
    elif role == "ar" and weights_kind(meta) == "merged":
        plain = (
            " Without `nla`: `config.json` + `backbone.safetensors` are blocks 0..K of the base"
            " (`AutoModel.from_config`, then `model.norm = torch.nn.Identity()` and `load_state_dict`);"
            " `head.safetensors` maps its last-token state, on the `prompts.ar_template` prompt, to the vector."
        )
    body = f"""
# {repo_id.split("/")[-1]}

The {ROLE_TEXT[role]}, one half of a Natural Language Autoencoder (NLA) for the residual stream of
{subject} at the output of decoder block **{meta["layer"]}** (d_model = {meta["d_model"]}).
Round trip: activation → AV → explanation → AR → activation; quality is the fraction of variance
explained (FVE) of the unit vectors on held-out rows.

{headline}

- stage: `{meta.get("stage")}`
- weights: {weights_text(meta)}
- injection: {injection_text}
- prompts and marker: verbatim in `nla_meta.yaml`, which `load_av` / `load_ar` check against the live tokenizer

## Evaluation (held-out rows; `_foreign`: the foreign corpus)

| metric | value |
|---|---:|
{table}

## Usage

Needs the `nla` package (this project) and the subject model {subject}.{plain}

{_usage(role, repo_id, meta)}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    return card


def check_card(path: Path, role: str, metrics: dict[str, float]) -> None:
    """Reload the card with huggingface_hub and check what the Hub reads from it (offline validation)."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    parsed = {r.metric_type: r.metric_value for r in card.data.eval_results or []}
    if TAGS[role] not in (card.data.tags or []) or parsed != metrics or "```python" not in card.text:
        raise NLAError(f"{path}: the model card did not round-trip through huggingface_hub; report this as a bug")


# ----------------------------------------------------------------------------- secrets


def assert_no_secret(folder: Path, secret: str | None) -> None:
    """Refuse to leave a token in any written file (defence in depth: nothing should ever write it)."""
    if not secret:
        return
    needle = secret.encode()
    for path in folder.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            raise NLAError(f"{path} contains the Hub token; remove it from the checkpoint before publishing")


# ----------------------------------------------------------------------------- the stage


def run_publish(
    cfg: NLAConfig, checkpoints: dict[str, Path], metrics_path: str | Path, out_dir: str | Path, layout: str = "nla"
) -> dict:
    """Build a Hub-ready folder per model under `out_dir` (atomically); uploading is `nla upload`.

    checkpoints: {"av": AV checkpoint folder, "ar": AR checkpoint folder} (typically the RL ones).
    layout: "nla" (this project's folders) or "kitft" (the released layout, see the module docstring).
    """
    if layout not in ("nla", "kitft"):
        raise NLAError(f"unknown publish layout {layout!r}; use nla or kitft")
    unknown = set(checkpoints) - set(ROLES)
    if unknown:
        raise NLAError(f"unknown model roles {sorted(unknown)}; publish takes {list(ROLES)}")
    metrics_path = Path(metrics_path)
    metrics = eval_metrics(json.loads(metrics_path.read_text(encoding="utf-8"))) if metrics_path.is_file() else {}
    namespace = cfg.publish.namespace or "<your-hub-user>"  # dry run without a namespace: a placeholder
    summary: dict[str, Any] = {"layout": layout, "models": {}}
    with atomic_dir(out_dir) as tmp:
        for role, checkpoint in checkpoints.items():
            checkpoint = Path(checkpoint)
            dest = tmp / role
            ours = dest if layout == "nla" else tmp / f".{role}.nla"
            export = export_av if role == "av" else export_ar
            meta = export(checkpoint, ours, cfg.publish.merge_weights)
            if layout == "kitft":
                meta = write_kitft(ours, read_sidecar(ours), dest)
                shutil.rmtree(ours)
            repo_id = f"{namespace}/{repo_name(cfg, meta, role)}"
            model_card(role, meta, repo_id, metrics).save(dest / CARD_NAME)
            check_card(dest / CARD_NAME, role, metrics)
            summary["models"][role] = {
                "repo_id": repo_id,
                "source": str(checkpoint),
                "weights": weights_kind(meta),
                "files": sorted(p.name for p in dest.iterdir()),
            }
        assert_no_secret(tmp, os.environ.get(cfg.publish.token_env))
        write_json(tmp / SUMMARY_NAME, summary)
    return summary
