"""Public NLA checkpoints: read their sidecars, load them, and write ours in their layout.

The published NLAs (nanoNLA and its forks, the paper's eight released checkpoints) carry an
``nla_meta.yaml`` of their own, in one of two kinds (docs/interop.md lists them key by key):

* the **dataset sidecar** (``kind: nla_dataset``, ``schema_version: 1``): nanoNLA's SFT script
  copies its training data's sidecar into the checkpoint, so the seed's Qwen3-8B AV carries it;
* the **model sidecar** (``kind: nla_model``, ``schema_version: 2``), role ``actor``/``critic`` as
  the training code writes it or ``av``/``ar`` as the releases do.

`read_meta` maps either into this project's sidecar dict, the one `load_av`, `load_ar` and
`sidecar.require` read, and keeps the original verbatim under ``source_sidecar``; this project's
own sidecars pass through unchanged. What the mapping decides, and why:

* **Injection.** Neither kind names the mode. A float ``injection_scale`` means ``replace`` at that
  scale (the paper's AVs); none means ``karvonen`` at the output of block 1 (nanoNLA, EasyNLA).
  ``injection=`` overrides; ``injection.note`` says which rule chose, and the CLI prints it.
  This project's injector matches both references: replace writes ``s·v/‖v‖`` at the embedding
  output; karvonen adds ``‖h‖·v/‖v‖`` at block 1 on every forward that holds the marker, i.e. the
  prefill (decode steps of one token carry no marker and are skipped, as in nanoNLA's hook).
* **Prompt.** The template (placeholder ``{injection_char}``) becomes ``prompts.av_user`` and is
  rendered as one user turn with the generation prompt and nothing else; public AVs write
  ``<explanation>\\n…\\n</explanation>`` themselves, so ``av_prefill: false`` (see nla/av.py).
* **Tokenizer.** `check_marker` repeats the reference loaders' checks before any weights load:
  the marker encodes to exactly its id (not UNK), the canonical prompt holds it once, and its
  neighbours equal the recorded ids.
* **The AR.** Three public file layouts (`AR_LAYOUTS`), each the first K+1 blocks with a
  ``Linear(d, d)`` head read at the last token. Their prompt is tokenized as one string
  (``ar_prompt_tokenization: one_string``): without special tokens in nanoNLA/EasyNLA, with them
  (a BOS for Gemma/Llama) in the paper's client; the hidden state is rescaled to ``mse_scale``
  (√d) before the head.

`convert` writes a checkpoint in this project's layout (``to="nla"``) or in the released one
(``to="kitft"``: full weights or a truncated HF model plus ``value_head.safetensors``, and a model
sidecar v2 in release naming that also embeds this project's sidecar under ``nla_meta``, so
reading it back is lossless). Hub ids resolve through ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from nla.ar import AR, MEAN_UNIT_FILE, identity_head, load_ar, truncate_to_layer
from nla.av import AV, av_prompt_ids, load_av, prompt_style
from nla.config import ModelConfig, PromptConfig
from nla.errors import NLAError
from nla.io import atomic_dir
from nla.models import d_model, load_model, load_tokenizer, num_layers, resolve_source
from nla.sidecar import (
    KINDS,
    SCHEMA_VERSION,
    SIDECAR_NAME,
    base_model_config,
    read_sidecar,
    require,
    sidecar_path,
    write_sidecar,
)

TARGETS = ("nla", "kitft")  # what `convert` writes
EMBEDDED_KEY = "nla_meta"  # this project's sidecar inside a public one we wrote
ROLES = {"actor": "av", "av": "av", "critic": "ar", "ar": "ar"}
KARVONEN_BLOCK = 1  # nanoNLA/EasyNLA add at the output of decoder block 1
EXPLANATION_OPEN, EXPLANATION_CLOSE = "<explanation>", "</explanation>"
SQRT_D = "sqrt_d_model"  # the public sidecars' name for a scale of √d_model
VALUE_HEAD_FILE = "value_head.safetensors"  # kitft / EasyNLA: the head beside a truncated HF model
LORA_AR_FILE = "ar_lora_value_head.safetensors"  # nanoNLA: LoRA weights and the head in one file
AR_META_FILE = "ar_meta.json"  # nanoNLA / EasyNLA: how the AR was built
AR_LAYOUTS = {
    "nla": "this project's AR (adapter or backbone, head.safetensors, mean_unit.safetensors)",
    "nanonla_lora": f"nanoNLA: a LoRA on the base model's first K+1 blocks plus the head, {LORA_AR_FILE}, {AR_META_FILE}",
    "easynla": f"EasyNLA: a merged truncated HF model, {VALUE_HEAD_FILE}, {AR_META_FILE}",
    "kitft": f"the paper's release: a truncated HF model and {VALUE_HEAD_FILE}",
}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


# ----------------------------------------------------------------------------- finding and reading


def resolve_checkpoint(name: str | Path) -> Path:
    """A checkpoint folder: `name` itself, or the snapshot of the Hub repo `owner/name`.

    `snapshot_download` honours the Hugging Face cache and ``HF_HUB_OFFLINE=1``, so an already
    downloaded repo resolves without the network.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    local = path.parent != Path(".") and path.parent.is_dir()  # e.g. data/checkpoints/x: a local path, mistyped
    if not HUB_ID.fullmatch(text) or text.startswith((".", "~")) or local:
        raise NLAError(f"checkpoint folder {text} not found; pass a folder or a Hub id such as owner/name")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text))
    except (OSError, ValueError) as err:  # the hub's errors (offline, not found, gated) are OSErrors
        first = (str(err).splitlines() or [""])[0]
        raise NLAError(
            f"cannot fetch {text} from the Hugging Face Hub ({type(err).__name__}: {first[:160]}); "
            "check the id and the network, log in for gated models, or pass a local folder"
        ) from None


def read_raw_sidecar(folder: str | Path) -> dict[str, Any]:
    """The folder's nla_meta.yaml as a mapping, whatever its kind."""
    path = sidecar_path(folder)
    if not path.is_file():
        raise NLAError(
            f"{path} is missing; an NLA checkpoint ships its sidecar beside the weights, copy the whole folder"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise NLAError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise NLAError(f"{path} is not valid YAML ({type(err).__name__}); fetch the checkpoint again") from None
    if not isinstance(raw, dict):
        raise NLAError(f"{path} must be a mapping; fetch the checkpoint again")
    return raw


def sidecar_format(raw: dict[str, Any], where: str) -> str:
    """'nla' (this project's, possibly embedded in a public sidecar we wrote), 'nla_dataset' or 'nla_model'."""
    kind, version = raw.get("kind"), raw.get("schema_version")
    if isinstance(raw.get(EMBEDDED_KEY), dict) or (kind in KINDS and version == SCHEMA_VERSION and "base_model" in raw):
        return "nla"
    if (kind, version) == ("nla_dataset", 1):
        return "nla_dataset"
    if (kind, version) == ("nla_model", 2):
        return "nla_model"
    raise NLAError(
        f"{where}: kind {kind!r}, schema_version {version!r} is neither this project's sidecar nor a public NLA one "
        "(nla_dataset v1, nla_model v2); point at an NLA checkpoint folder"
    )


def public_ar_layout(folder: Path) -> str | None:
    """Which public AR layout the folder's files are, or None when it holds none."""
    if (folder / LORA_AR_FILE).is_file():
        return "nanonla_lora"
    if (folder / VALUE_HEAD_FILE).is_file():
        return "easynla" if (folder / AR_META_FILE).is_file() else "kitft"
    return None


def read_meta(folder: str | Path, *, injection: str | None = None) -> dict[str, Any]:
    """This project's sidecar dict for any NLA checkpoint folder (see the module docstring)."""
    folder = Path(folder)
    where = str(sidecar_path(folder))
    raw = read_raw_sidecar(folder)
    fmt = sidecar_format(raw, where)
    if fmt != "nla":
        return translate(raw, folder, fmt, injection)
    meta = copy.deepcopy(raw[EMBEDDED_KEY]) if EMBEDDED_KEY in raw else read_sidecar(folder)
    if injection is not None:
        meta["injection"] = override_injection(meta, injection, where)
    return meta


# ----------------------------------------------------------------------------- translation


def resolve_scale(raw: Any, d: int, where: str) -> float | None:
    """A public scale (None / 'raw' / 'none', 'sqrt_d_model', a number or numeric string) as a float or None."""
    if raw is None or raw in ("raw", "none"):
        return None
    if raw == SQRT_D:
        return math.sqrt(d)
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except (TypeError, ValueError):
        raise NLAError(f"{where}: scale {raw!r} is not null, {SQRT_D!r} or a number; fix the sidecar") from None
    if not math.isfinite(value) or value <= 0:
        raise NLAError(f"{where}: scale {raw!r} must be a positive number; fix the sidecar")
    return value


def choose_injection(scale: float | None, override: str | None, where: str) -> dict[str, Any]:
    """The injection of a public AV: the sidecar's rule (a scale: replace; none: karvonen) unless overridden."""
    rule = "replace" if scale is not None else "karvonen"
    if override not in (None, "replace", "karvonen"):
        raise NLAError(f"unknown injection {override!r}; use replace or karvonen")
    mode = override or rule
    if mode == "replace" and scale is None:
        raise NLAError(f"{where}: replace injection needs an injection_scale, which the sidecar lacks; use karvonen")
    if override is not None and override != rule:
        note = f"{mode} chosen by the caller (the sidecar's rule says {rule})"
    elif mode == "replace":
        note = f"replace at scale {scale:g}: the sidecar's injection_scale"
    else:
        note = f"karvonen at the output of block {KARVONEN_BLOCK}: the sidecar has no injection_scale"
    return {"mode": mode, "scale": scale, "karvonen_block": KARVONEN_BLOCK, "note": note}


def override_injection(meta: dict[str, Any], mode: str, where: str) -> dict[str, Any]:
    """This project's sidecar injection with the mode switched (replace keeps needing the recorded scale)."""
    injection = dict(meta.get("injection") or {})
    if mode not in ("replace", "karvonen"):
        raise NLAError(f"unknown injection {mode!r}; use replace or karvonen")
    if mode == "replace" and injection.get("scale") is None:
        raise NLAError(f"{where}: replace injection needs a scale, which the sidecar lacks; use karvonen")
    was = injection.get("mode")
    injection.setdefault("karvonen_block", KARVONEN_BLOCK)
    injection.update(mode=mode, note=f"{mode} chosen by the caller (the sidecar says {was})" if mode != was else None)
    return injection


def _from_public(template: Any, field: str, slot: str, *, escape: bool, where: str) -> str:
    """A public str.format template with one `{field}` as this project's template with `slot` in its place.

    `escape`: the result is itself filled with str.format (prompts.av_user), so literal braces stay doubled.
    """
    sentinel = "\x00slot\x00"
    try:
        filled = template.format(**{field: sentinel})
    except (AttributeError, KeyError, IndexError, ValueError) as err:
        raise NLAError(
            f"{where}: prompt template {template!r} is not a format string with only {{{field}}} "
            f"({type(err).__name__}); fix prompt_templates in the sidecar"
        ) from None
    if filled.count(sentinel) != 1:
        raise NLAError(f"{where}: the prompt template must hold {{{field}}} exactly once; fix prompt_templates")
    if escape:
        filled = filled.replace("{", "{{").replace("}", "}}")
    return filled.replace(sentinel, slot)


def _to_public(template: str, slot: str, field: str, *, escaped: bool) -> str:
    """The inverse of `_from_public`: this project's template as a public one with `{field}`."""
    sentinel = "\x00slot\x00"
    literal = template.format(**{slot.strip("{}"): sentinel}) if escaped else template.replace(slot, sentinel)
    return literal.replace("{", "{{").replace("}", "}}").replace(sentinel, "{" + field + "}")


def _integer(value: Any, key: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise NLAError(f"{where}: {key} must be a non-negative integer, got {value!r}; fix the sidecar")
    return value


def _layer(raw: dict[str, Any], dataset: bool, where: str) -> int:
    """K, the block whose output the vectors are: each place a public sidecar may record it."""
    critic = raw.get("critic") or {}
    extraction = raw.get("extraction") or {}
    candidates = (
        [("extraction.layer_index", extraction.get("layer_index"))]
        if dataset
        else [
            ("extraction_layer_index", raw.get("extraction_layer_index")),
            ("critic.extraction_layer_index", critic.get("extraction_layer_index")),
            ("critic.num_hidden_layers", critic.get("num_hidden_layers")),
            ("extraction.layer_index", extraction.get("layer_index")),
        ]
    )
    for key, value in candidates:
        if value is not None:
            return _integer(value, key, where)
    raise NLAError(f"{where} records no layer (looked at {[k for k, _ in candidates]}); add the layer to the sidecar")


def translate(raw: dict[str, Any], folder: Path, fmt: str, injection: str | None = None) -> dict[str, Any]:
    """A public sidecar (`fmt` 'nla_dataset' or 'nla_model') as this project's sidecar dict."""
    where = str(sidecar_path(folder))
    dataset = fmt == "nla_dataset"
    extraction = raw.get("extraction") or {}
    d = _integer(extraction.get("d_model") if dataset else raw.get("d_model"), "d_model", where)
    layer = _layer(raw, dataset, where)
    base = extraction.get("base_model") if dataset else raw.get("base_checkpoint") or extraction.get("base_model")
    if not isinstance(base, str) or not base:
        key = "extraction.base_model" if dataset else "base_checkpoint"
        raise NLAError(f"{where} names no base model ({key}); add it to the sidecar")
    if dataset:
        role = "ar" if public_ar_layout(folder) else "av"
    elif (role := ROLES.get(raw.get("role"))) is None:
        raise NLAError(f"{where}: role {raw.get('role')!r} is not one of {sorted(ROLES)}; fix the sidecar")
    templates = raw.get("prompt_templates") or {}
    meta: dict[str, Any] = {
        "kind": "nla_model",
        "schema_version": SCHEMA_VERSION,
        "stage": f"imported:{raw.get('stage') or fmt}",
        "role": role,
        "base_model": base,
        "d_model": d,
        "layer": layer,
        "dtype": "auto",
        "source_format": fmt,
    }
    ar_template = templates.get("ar") or templates.get("critic")
    prompts = (
        {}
        if ar_template is None
        else {"ar_template": _from_public(ar_template, "explanation", "{explanation}", escape=False, where=where)}
    )
    if role == "av":
        meta.update(_av_fields(raw, folder, d, injection, where))
        meta["prompts"] = {**meta["prompts"], **prompts}
    else:
        if ar_template is None:
            raise NLAError(f"{where} has no AR prompt template (prompt_templates.critic or .ar); fix the sidecar")
        meta.update(_ar_fields(raw, folder, d, layer, where))
        meta["prompts"] = prompts
    meta["source_sidecar"] = raw
    return meta


def _av_fields(raw: dict[str, Any], folder: Path, d: int, injection: str | None, where: str) -> dict[str, Any]:
    tokens = raw.get("tokens") or {}
    keys = ("injection_char", "injection_token_id", "injection_left_neighbor_id", "injection_right_neighbor_id")
    missing = [f"tokens.{k}" for k in keys if tokens.get(k) is None]
    templates = raw.get("prompt_templates") or {}
    template = templates.get("av") or templates.get("actor")
    if template is None:
        missing.append("prompt_templates.actor (or .av)")
    if missing:
        raise NLAError(f"{where} lacks {missing}; an AV sidecar needs them, fetch the checkpoint again")
    char = tokens["injection_char"]
    if not isinstance(char, str) or len(char) != 1:
        raise NLAError(f"{where}: tokens.injection_char must be one character, got {char!r}; fix the sidecar")
    scale = resolve_scale((raw.get("extraction") or {}).get("injection_scale"), d, where)
    return {
        "weights": "adapter" if (folder / "adapter_config.json").is_file() else "full",
        "merged": False,
        "marker": {
            "char": char,
            "token_id": _integer(tokens["injection_token_id"], "tokens.injection_token_id", where),
            "left_id": _integer(tokens["injection_left_neighbor_id"], "tokens.injection_left_neighbor_id", where),
            "right_id": _integer(tokens["injection_right_neighbor_id"], "tokens.injection_right_neighbor_id", where),
        },
        "injection": choose_injection(scale, injection, where),
        "prompts": {
            "av_user": _from_public(template, "injection_char", "{marker}", escape=True, where=where),
            "av_answer_open": EXPLANATION_OPEN,
            "av_answer_close": EXPLANATION_CLOSE,
        },
        "av_prefill": False,
    }


def _ar_fields(raw: dict[str, Any], folder: Path, d: int, layer: int, where: str) -> dict[str, Any]:
    layout = public_ar_layout(folder)
    if layout is None:
        raise NLAError(
            f"{folder} has an AR sidecar but none of the public AR files ({VALUE_HEAD_FILE}, {LORA_AR_FILE}); "
            "copy the whole checkpoint folder"
        )
    built: dict[str, Any] = {}
    if (folder / AR_META_FILE).is_file():
        try:
            built = json.loads((folder / AR_META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise NLAError(f"{folder / AR_META_FILE} is not readable JSON; fetch the checkpoint again") from None
    kept = built.get("ar_num_layers", layer + 1)
    if kept != layer + 1:
        raise NLAError(
            f"{folder / AR_META_FILE}: ar_num_layers={kept!r} but the sidecar's layer {layer} needs {layer + 1} "
            "blocks (0..K); the files are from different checkpoints"
        )
    fields: dict[str, Any] = {
        "ar_layout": layout,
        "blocks_kept": layer + 1,
        "max_explanation_tokens": None,
        "ar_prompt_tokenization": "one_string",
        # The paper's client adds special tokens (a BOS for Gemma/Llama); nanoNLA and EasyNLA train without.
        "ar_add_special_tokens": layout == "kitft",
        "ar_head_input_norm": resolve_scale((raw.get("extraction") or {}).get("mse_scale", SQRT_D), d, where),
        # ar_meta.json records it (EasyNLA reads a missing key as "kept"); the paper's client always strips it.
        "final_norm_stripped": bool(built.get("final_norm_stripped", layout == "kitft")),
    }
    if layout == "nanonla_lora":
        try:
            fields["lora"] = {
                "r": int(built["lora_r"]),
                "alpha": float(built["lora_alpha"]),
                "target_modules": list(built["target_modules"]),
                "use_rslora": bool(built.get("use_rslora", True)),  # nanoNLA trains rsLoRA and does not record it
                "quant": built.get("quant"),
            }
        except (KeyError, TypeError, ValueError):
            raise NLAError(
                f"{folder / AR_META_FILE} lacks lora_r, lora_alpha or target_modules; fetch the checkpoint again"
            ) from None
    return fields


# ----------------------------------------------------------------------------- tokenizer checks


def check_marker(tokenizer, meta: dict[str, Any], where: str) -> None:
    """The reference loaders' checks of a live tokenizer against an AV sidecar, one NLAError line each."""
    marker = meta["marker"]
    char, token_id = marker["char"], marker["token_id"]
    ids = tokenizer.encode(char, add_special_tokens=False)
    if ids != [token_id]:
        raise NLAError(
            f"{where}: the tokenizer encodes the marker {char!r} as {ids}, the sidecar says [{token_id}]; "
            "use the tokenizer shipped with the checkpoint"
        )
    if token_id == tokenizer.unk_token_id:
        raise NLAError(
            f"{where}: the marker {char!r} is this tokenizer's unknown token; use the checkpoint's tokenizer"
        )
    prompt = av_prompt_ids(tokenizer, PromptConfig(**meta["prompts"]), char, **prompt_style(meta))
    hits = [i for i, t in enumerate(prompt) if t == token_id]
    if len(hits) != 1 or hits[0] in (0, len(prompt) - 1):
        raise NLAError(
            f"{where}: the canonical AV prompt holds the marker {len(hits)} time(s) (needs exactly once, inside); "
            "fix the AV prompt template in the sidecar"
        )
    p = hits[0]
    live, recorded = (prompt[p - 1], prompt[p + 1]), (marker["left_id"], marker["right_id"])
    if live != recorded:
        raise NLAError(
            f"{where}: the marker's neighbours in the canonical AV prompt are {live}, the sidecar says {recorded}; "
            "use the tokenizer and chat template shipped with the checkpoint"
        )


def describe(meta: dict[str, Any]) -> str:
    """One line on what was loaded and which injection runs, e.g. for the CLI to print."""
    fmt = meta.get("source_format", "nla")
    if meta.get("role") == "ar":
        return f"{fmt} AR, layout {meta.get('ar_layout', 'nla')}, prompt tokenized {meta.get('ar_prompt_tokenization', 'piecewise')}"
    injection = meta.get("injection") or {}
    how = injection.get("note") or (
        f"scale {injection['scale']:g}"
        if injection.get("mode") == "replace" and injection.get("scale")
        else "the sidecar's"
    )
    return f"{fmt} AV, injection {injection.get('mode')} ({how}), prefill {'on' if prompt_style(meta)['prefill'] else 'off'}"


# ----------------------------------------------------------------------------- loading


def _with_dtype(meta: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    return meta if dtype is None else {**meta, "dtype": dtype}


def load_any_av(
    name: str | Path,
    device: str = "auto",
    *,
    injection: str | None = None,
    layer: int | None = None,
    dtype: str | None = None,
) -> AV:
    """An AV from a folder or Hub id in any known format; the tokenizer is checked before the weights load."""
    folder = resolve_checkpoint(name)
    meta = _with_dtype(read_meta(folder, injection=injection), dtype)
    require(meta, where=str(folder), role="av")
    check_marker(load_tokenizer(resolve_source(str(folder))), meta, str(folder))
    return load_av(folder, device, layer=layer, meta=meta)


def load_any_ar(name: str | Path, device: str = "auto", *, dtype: str | None = None) -> AR:
    """An AR from a folder or Hub id: this project's layout or any of `AR_LAYOUTS`."""
    folder = resolve_checkpoint(name)
    meta = _with_dtype(read_meta(folder), dtype)
    require(meta, where=str(folder), role="ar")
    layout = meta.get("ar_layout", "nla")
    if layout not in AR_LAYOUTS:
        raise NLAError(f"{folder}: ar_layout {layout!r} is not one of {sorted(AR_LAYOUTS)}; fix the sidecar")
    return load_ar(folder, device, meta=meta) if layout == "nla" else load_public_ar(folder, meta, device)


def merge_lora(causal_lm: torch.nn.Module, state: dict[str, torch.Tensor], lora: dict[str, Any], where: str) -> int:
    """Add nanoNLA's LoRA deltas into the weights in place, W ← W + s·B·A; returns how many modules.

    s = alpha/√r for rsLoRA (nanoNLA's setting), alpha/r otherwise. Keys are as nanoNLA saved them:
    ``backbone.<module path>.lora_A.<adapter>.weight`` and the matching ``lora_B``.
    """
    r = lora["r"]
    scaling = lora["alpha"] / (math.sqrt(r) if lora.get("use_rslora", True) else r)
    pattern = re.compile(r"(?:backbone\.)?(.+)\.lora_A(?:\.[^.]+)?\.weight")
    merged = 0
    for key, a in state.items():
        match = pattern.fullmatch(key)
        if match is None:
            continue
        b = state.get(key.replace(".lora_A", ".lora_B"))
        try:
            module = causal_lm.get_submodule(match.group(1))
        except AttributeError:
            module = None
        if b is None or module is None or tuple(module.weight.shape) != (b.shape[0], a.shape[1]):
            raise NLAError(
                f"{where}: LoRA weights {key} do not fit this base model's first K+1 blocks; "
                "use the base model and layer the AR was trained on"
            )
        with torch.no_grad():
            delta = scaling * (b.float() @ a.float())  # (out, in)
            module.weight.copy_((module.weight.float() + delta.to(module.weight.device)).to(module.weight.dtype))
        merged += 1
    lora_keys = sum(".lora_A" in k or ".lora_B" in k for k in state)
    if merged == 0 or 2 * merged != lora_keys or len(state) != lora_keys:
        raise NLAError(f"{where}: expected only LoRA A/B pairs besides value_head.weight; fetch the checkpoint again")
    return merged


def load_public_ar(folder: str | Path, meta: dict[str, Any], device: str = "auto") -> AR:
    """An AR in one of the public layouts (meta from `read_meta`), as this project's `AR`."""
    folder = Path(folder)
    where, layer, layout = str(folder), int(meta["layer"]), meta["ar_layout"]
    if layout == "nanonla_lora":  # the base model's own weights plus the LoRA deltas
        model, _, _ = load_model(base_model_config(meta, device))
    else:  # a truncated HF model: blocks 0..K only
        model, _, _ = load_model(ModelConfig(name=where, dtype=meta.get("dtype", "auto"), device=device))
        if num_layers(model) != layer + 1:
            raise NLAError(
                f"{where}: config.json has {num_layers(model)} blocks but layer {layer} needs {layer + 1} (0..K); "
                "the sidecar and the weights are from different checkpoints"
            )
    require(meta, where=where, d_model=d_model(model))
    backbone, _ = truncate_to_layer(model, layer, keep_final_norm=not meta.get("final_norm_stripped", True))
    if layout == "nanonla_lora":
        state = load_file(str(folder / LORA_AR_FILE))
        head_weight = state.pop("value_head.weight", None)
        merge_lora(model, state, meta["lora"], f"{folder / LORA_AR_FILE}")
    else:
        head_weight = load_file(str(folder / VALUE_HEAD_FILE)).get("weight")
    d = meta["d_model"]
    if head_weight is None or tuple(head_weight.shape) != (d, d):
        shape = None if head_weight is None else tuple(head_weight.shape)
        raise NLAError(f"{where}: the value head is {shape}, not ({d}, {d}); fetch the checkpoint again")
    head = identity_head(d)
    with torch.no_grad():
        head.weight.copy_(head_weight.float())
    mean_unit = load_file(str(folder / MEAN_UNIT_FILE))["mean_unit"] if (folder / MEAN_UNIT_FILE).is_file() else None
    tokenizer = load_tokenizer(resolve_source(where))
    ar = AR(backbone.requires_grad_(False), tokenizer, meta, head, mean_unit)
    return ar.to(next(backbone.parameters()).device).eval()


# ----------------------------------------------------------------------------- writing


def _copy_tree(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Every file under `src` but its sidecar (and `skip`), hidden files excluded."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and rel.parts[0] not in (SIDECAR_NAME, *skip) and not rel.parts[-1].startswith("."):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)


def kitft_sidecar(meta: dict[str, Any]) -> dict[str, Any]:
    """A model sidecar v2 in release naming for this project's `meta`, with `meta` embedded for a lossless return."""
    d, layer, role = int(meta["d_model"]), int(meta["layer"]), meta["role"]
    prompts, injection, marker = meta.get("prompts") or {}, meta.get("injection") or {}, meta.get("marker")
    templates = {}
    if role == "av":
        templates["av"] = _to_public(prompts["av_user"], "{marker}", "injection_char", escaped=True)
    if prompts.get("ar_template"):
        templates["ar"] = _to_public(prompts["ar_template"], "{explanation}", "explanation", escaped=False)
    public: dict[str, Any] = {
        "kind": "nla_model",
        "schema_version": 2,
        "role": role,
        "stage": meta.get("stage"),
        "base_checkpoint": meta["base_model"],
        "d_model": d,
        "extraction_layer_index": layer,
        "critic": {"extraction_layer_index": layer},
        "extraction": {
            "injection_scale": injection.get("scale") if injection.get("mode") == "replace" else None,
            "mse_scale": meta.get("ar_head_input_norm") or math.sqrt(d),
        },
        "prompt_templates": templates,
        "trained_on": [],
        "parent_checkpoints": [],
        "created_at": meta.get("created_at"),
        "created_by": "nla convert --to kitft",
    }
    if marker:
        public["tokens"] = {
            "injection_char": marker["char"],
            "injection_token_id": marker["token_id"],
            "injection_left_neighbor_id": marker["left_id"],
            "injection_right_neighbor_id": marker["right_id"],
            "critic_suffix_ids": None,
        }
    public[EMBEDDED_KEY] = meta
    return public


def save_truncated_ar(ar: AR, dest: Path) -> None:
    """The AR as the paper releases it: a K+1-block HF causal LM (adapters merged) plus value_head.safetensors."""
    backbone = ar.backbone
    if hasattr(backbone, "merge_and_unload"):  # a PEFT-wrapped backbone (this project's LoRA AR)
        backbone = copy.deepcopy(backbone).merge_and_unload()
    config = copy.deepcopy(backbone.config)
    text = getattr(config, "text_config", None) or config
    text.num_hidden_layers = int(ar.meta["layer"]) + 1
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[: text.num_hidden_layers]
    dtype = next(backbone.parameters()).dtype
    causal = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = causal.base_model.load_state_dict(backbone.state_dict(), strict=False)
    if unexpected or any(not k.endswith("norm.weight") for k in missing):  # only the stripped final norm may lack
        raise NLAError(f"cannot write the AR as a truncated model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    causal.save_pretrained(dest)
    ar.tokenizer.save_pretrained(dest)
    save_file({"weight": ar.head.weight.detach().float().cpu().contiguous()}, str(dest / VALUE_HEAD_FILE))
    if ar.mean_unit is not None:
        save_file({"mean_unit": ar.mean_unit.float().contiguous()}, str(dest / MEAN_UNIT_FILE))


def write_nla(folder: Path, meta: dict[str, Any], dest: str | Path) -> dict[str, Any]:
    """The checkpoint with this project's sidecar: the files stay (public AVs and ARs load from them as they are)."""
    with atomic_dir(dest) as tmp:
        _copy_tree(folder, tmp)
        write_sidecar(tmp, meta)
    return meta


def write_kitft(folder: Path, meta: dict[str, Any], dest: str | Path) -> dict[str, Any]:
    """The checkpoint in the released layout (full AV weights; a truncated AR model and its value head)."""
    role = meta["role"]
    out = copy.deepcopy(meta)
    with atomic_dir(dest) as tmp:
        if role == "av" and meta.get("weights") == "full":
            _copy_tree(folder, tmp, skip=("merged",))
        elif role == "av":  # an adapter: the inference load merges it, the merged weights are what ships
            av = load_av(folder, "cpu", meta=meta)
            av.injector.remove()
            av.model.save_pretrained(tmp)
            av.tokenizer.save_pretrained(tmp)
        elif meta.get("ar_layout") in ("kitft", "easynla"):
            _copy_tree(folder, tmp)
        else:  # this project's AR or nanoNLA's LoRA: rebuilt, merged and saved truncated
            layout = meta.get("ar_layout", "nla")
            save_truncated_ar(
                load_ar(folder, "cpu", meta=meta) if layout == "nla" else load_public_ar(folder, meta, "cpu"), tmp
            )
        if role == "av":
            out.update(weights="full", merged=False)
        else:  # the conventions it was trained with (tokenization, final norm) stay recorded as they were
            out["ar_layout"] = "easynla" if meta.get("ar_layout") == "easynla" else "kitft"
        write_sidecar(tmp, kitft_sidecar(out))
    return out


def convert(src: str | Path, dest: str | Path, *, to: str = "nla", injection: str | None = None) -> dict[str, Any]:
    """Write the checkpoint at `src` (folder or Hub id, any format) to `dest` in layout `to`; returns its sidecar."""
    if to not in TARGETS:
        raise NLAError(f"unknown target format {to!r}; use one of {TARGETS}")
    folder = resolve_checkpoint(src)
    if Path(dest).resolve() == folder.resolve():
        raise NLAError(f"{dest} is the source folder; write the converted checkpoint somewhere else")
    meta = read_meta(folder, injection=injection)
    return write_nla(folder, meta, dest) if to == "nla" else write_kitft(folder, meta, dest)
