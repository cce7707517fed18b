"""`nla_meta.yaml`: the sidecar that travels with every dataset table and checkpoint.

It records everything a consumer needs to use an artifact correctly (model identity,
d_model, layer, marker, injection, prompts, parents, git commit). Readers call
`check_compatible` against the live model/tokenizer and refuse to run on a mismatch.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import yaml

from nla.config import NLAError
from nla.io import atomic_write_text

SIDECAR_NAME = "nla_meta.yaml"
SCHEMA_VERSION = 1
KINDS = ("nla_dataset", "nla_model")
REQUIRED_KEYS = ("kind", "schema_version", "stage", "base_model", "d_model", "layer")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make_meta(kind: str, stage: str, **fields: Any) -> dict[str, Any]:
    """A sidecar dict with the common keys filled; `fields` adds or overrides the rest."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    meta: dict[str, Any] = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "git_commit": git_commit(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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


def check_compatible(
    meta: dict[str, Any],
    *,
    where: str,
    d_model: int | None = None,
    layer: int | None = None,
    marker: dict[str, Any] | None = None,
    base_model: str | None = None,
) -> None:
    """Raise when the sidecar disagrees with the live model/tokenizer/config."""
    checks = [("d_model", d_model), ("layer", layer), ("base_model", base_model)]
    for key, live in checks:
        if live is not None and meta.get(key) != live:
            raise NLAError(
                f"{where}: sidecar {key}={meta.get(key)!r} but the live value is {live!r}; "
                f"use the model/params the artifact was built with or rebuild it"
            )
    if marker is not None and meta.get("marker") is not None:
        for key in ("token_id", "left_id", "right_id"):
            if meta["marker"].get(key) != marker.get(key):
                raise NLAError(
                    f"{where}: sidecar marker {key}={meta['marker'].get(key)!r} but the tokenizer gives "
                    f"{marker.get(key)!r}; use the tokenizer the checkpoint was trained with"
                )
