"""`nla_meta.yaml`: the sidecar that travels with every dataset table and checkpoint.

It records everything a consumer needs to use an artifact correctly (model identity,
d_model, layer, marker, injection, prompts, parents), and nothing that differs between two
runs of identical inputs (clock, host, git commit: those go to `nla.provenance`), so a
rerun writes the same bytes and DVC's cascade stops there. Readers call
`require` against the live model/tokenizer and refuse to run on a mismatch: it is the one
compatibility contract, called by every loader and stage. `base_model_config` turns an
artifact's sidecar back into the `ModelConfig` of the subject model it was built from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nla.config import ModelConfig
from nla.errors import NLAError
from nla.io import atomic_write_text

SIDECAR_NAME = "nla_meta.yaml"
SCHEMA_VERSION = 1
KINDS = ("nla_dataset", "nla_model")
REQUIRED_KEYS = ("kind", "schema_version", "stage", "base_model", "d_model", "layer")


def make_meta(kind: str, stage: str, **fields: Any) -> dict[str, Any]:
    """A sidecar dict with the common keys filled; `fields` adds or overrides the rest."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    meta: dict[str, Any] = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
    }
    meta.update(fields)
    return meta


def sidecar_path(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder if folder.name == SIDECAR_NAME else folder / SIDECAR_NAME


def write_sidecar(folder: str | Path, meta: dict[str, Any]) -> Path:
    path = sidecar_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
    return path


def read_sidecar(folder: str | Path) -> dict[str, Any]:
    """Load and validate the structure of a sidecar; a clear NLAError on anything malformed."""
    path = sidecar_path(folder)
    if not path.is_file():
        raise NLAError(f"{path} is missing; rebuild the artifact with its stage (e.g. `dvc repro`)")
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise NLAError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
    # ValueError: an impossible date such as 2024-02-30; RecursionError: absurdly deep nesting.
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise NLAError(f"{path} is not valid YAML ({type(err).__name__}); rebuild the artifact") from None
    if not isinstance(meta, dict):
        raise NLAError(f"{path} must be a mapping; rebuild the artifact")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise NLAError(f"{path} lacks keys {missing}; rebuild the artifact with this version of nla")
    if meta["kind"] not in KINDS:
        raise NLAError(f"{path}: kind {meta['kind']!r} is not one of {KINDS}; point at an nla artifact")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise NLAError(
            f"{path}: schema_version {meta['schema_version']!r} is not {SCHEMA_VERSION}; rebuild the artifact"
        )
    for key in ("d_model", "layer"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise NLAError(f"{path}: {key} must be a non-negative integer; rebuild the artifact")
    if meta.get("marker") is not None and not isinstance(meta["marker"], dict):
        raise NLAError(f"{path}: marker must be a mapping (char, token_id, left_id, right_id); rebuild the artifact")
    return meta


def require(
    meta: dict[str, Any],
    *,
    where: str,
    role: str | None = None,
    fingerprint: str | None = None,
    d_model: int | None = None,
    layer: int | None = None,
    marker: dict[str, Any] | None = None,
) -> None:
    """Raise one NLAError line when the sidecar disagrees with what the caller is about to use.

    role: 'av' or 'ar' (checkpoints only); fingerprint: the live base model's identity
    (`ModelSource.fingerprint`); d_model, layer: of the live model or of the activations fed in;
    marker: the live tokenizer's anchored marker (`Marker.to_dict()`).
    """
    if role is not None and (meta.get("kind") != "nla_model" or meta.get("role") != role):
        raise NLAError(
            f"{where} is a {meta.get('kind')}/{meta.get('role')} artifact, not an {role.upper()} checkpoint; "
            f"point at an {role} folder (e.g. data/checkpoints/av_sft or data/checkpoints/rl/{role})"
        )
    recorded = meta.get("base_model_fingerprint")
    if fingerprint is not None and recorded is not None and recorded != fingerprint:
        raise NLAError(
            f"{where}: built from base model {recorded} but '{meta.get('base_model')}' resolves to {fingerprint}; "
            "install the model it was built from, or rebuild it"
        )
    for key, live in (("d_model", d_model), ("layer", layer)):
        if live is not None and meta.get(key) != live:
            raise NLAError(
                f"{where}: sidecar {key}={meta.get(key)!r} but the live value is {live!r}; "
                "use the model/activations it was built for, or rebuild it"
            )
    if marker is not None and meta.get("marker") is not None:
        for key in ("token_id", "left_id", "right_id"):
            if meta["marker"].get(key) != marker.get(key):
                raise NLAError(
                    f"{where}: sidecar marker {key}={meta['marker'].get(key)!r} but the tokenizer gives "
                    f"{marker.get(key)!r}; use the tokenizer the checkpoint was trained with"
                )


def base_model_config(meta: dict[str, Any], device: str = "auto") -> ModelConfig:
    """The subject model an artifact was built from, as a `ModelConfig` (at the artifact's layer)."""
    return ModelConfig(
        name=meta["base_model"],
        gguf_file=meta.get("base_model_gguf_file"),
        revision=meta.get("base_model_revision"),
        dtype=meta.get("dtype", "auto"),
        layer=meta["layer"],
        device=device,
    )
