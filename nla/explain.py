"""Inference: text (or saved vectors) → activation at the AV's layer → explanation → round-trip FVE.

`explain` runs the subject model named in the AV's sidecar up to its layer K (never a
hard-coded layer), takes the residual at the requested token positions, lets the AV write
one greedy explanation per vector, and, when an AR is given, reconstructs each vector from
its explanation and reports the per-row FVE against the AR's training reference
(1 − mse_nrm / mean ‖u − ū‖² of its training rows). Models are loaded one at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from nla.config import PATHS, ModelConfig, NLAError
from nla.evaluate import mse_nrm

Positions = list[int] | Literal["all"] | None


@dataclass(frozen=True)
class ExplainRecord:
    text: str | None  # the input text (None for vectors from a file)
    position: int | None  # token index in the text (None for vectors from a file)
    token: str | None
    explanation: str
    closed: bool  # the AV closed its answer before the token cap
    fve: float | None  # round-trip FVE of this vector (needs an AR)
    cos: float | None  # cosine of the AR's reconstruction with the vector (needs an AR)

    def to_dict(self) -> dict:
        return asdict(self)


def default_checkpoints(root: str | Path = ".") -> tuple[Path, Path | None]:
    """(AV, AR) to use when none is named: the RL pair when it exists, else the SFT pair."""
    root = Path(root)
    rl = root / PATHS.rl
    if (rl / "av").is_dir():
        return rl / "av", (rl / "ar") if (rl / "ar").is_dir() else None
    ar = root / PATHS.ar_sft
    return root / PATHS.av_sft, ar if ar.is_dir() else None


def _pick(av_dir, ar_dir) -> tuple[Path, Path | None]:
    """Named checkpoints win; an unnamed AV means the default pair (and its AR unless one is named)."""
    if av_dir is not None:
        return Path(av_dir), None if ar_dir is None else Path(ar_dir)
    default_av, default_ar = default_checkpoints()
    return default_av, Path(ar_dir) if ar_dir is not None else default_ar


def _release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_positions(n_tokens: int, positions: Positions, special: list[bool]) -> list[int]:
    """Token indices for one text: the last token (None), every non-special token ('all'), or the list
    given (negative counts from the end)."""
    if positions is None:
        return [n_tokens - 1]
    if positions == "all":
        return [p for p in range(n_tokens) if not special[p]]
    out = []
    for p in positions:
        q = p + n_tokens if p < 0 else p
        if not 0 <= q < n_tokens:
            raise NLAError(f"position {p} is outside a text of {n_tokens} tokens; use 0..{n_tokens - 1} or negative")
        out.append(q)
    return out


@torch.no_grad()
def subject_activations(
    av_meta: dict,
    texts: list[str],
    positions: Positions,
    *,
    device: str = "auto",
    batch_size: int = 16,
    max_tokens: int = 512,
):
    """Residual vectors at the AV's layer for the requested positions: (vectors (N, d), [(text, pos, token)])."""
    from nla.models import load_model, residual_at

    cfg = ModelConfig(
        name=av_meta["base_model"],
        gguf_file=av_meta.get("base_model_gguf_file"),
        revision=av_meta.get("base_model_revision"),
        dtype=av_meta.get("dtype", "auto"),
        layer=av_meta["layer"],
        device=device,
    )
    model, tokenizer, source = load_model(cfg)
    if av_meta.get("base_model_fingerprint") not in (None, source.fingerprint):
        raise NLAError(
            f"the AV was trained on {av_meta['base_model_fingerprint']} but '{cfg.name}' resolves to "
            f"{source.fingerprint}; install the subject model the AV was trained on"
        )
    special_ids = set(tokenizer.all_special_ids)
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
    device_ = next(model.parameters()).device
    vectors, sites = [], []
    for start in range(0, len(texts), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, row in enumerate(batch):
            ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        hidden = residual_at(model, cfg.layer, ids.to(device_), mask.to(device_)).float().cpu()
        for r, row in enumerate(batch):
            if not row:
                raise NLAError(f"text {start + r} is empty; pass some text to explain")
            for p in resolve_positions(len(row), positions, [t in special_ids for t in row]):
                vectors.append(hidden[r, p])
                sites.append((texts[start + r], p, tokenizer.decode([row[p]])))
    del model
    _release()
    if not vectors:
        raise NLAError("no token positions to explain (every token is special); pass longer text")
    return torch.stack(vectors), sites


def _verbalize(
    vectors: torch.Tensor,
    sites: list,
    av_dir,
    ar_dir,
    *,
    device: str,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    av=None,
) -> list[ExplainRecord]:
    from nla.av import load_av

    av = av or load_av(av_dir, device)
    av_meta = av.meta
    explanations = av.generate(vectors, max_new_tokens, temperature=temperature, batch_size=batch_size)
    del av
    _release()
    fve = cos = [None] * len(explanations)
    if ar_dir is not None:
        from nla.ar import load_ar

        ar = load_ar(ar_dir, device)
        for key in ("layer", "d_model", "base_model_fingerprint"):
            if ar.meta.get(key) != av_meta.get(key):
                raise NLAError(
                    f"AR {ar_dir} has {key}={ar.meta.get(key)!r} but the AV has {av_meta.get(key)!r}; "
                    "pass an AR trained with this AV's model and layer"
                )
        if ar.fve_denominator is None:
            raise NLAError(f"{ar_dir} lacks the FVE reference (fve_denominator); retrain it with `nla ar-sft`")
        mse = mse_nrm(ar.reconstruct([e.text for e in explanations], batch_size), vectors)
        fve = (1 - mse / ar.fve_denominator).tolist()
        cos = (1 - mse / 2).tolist()
        del ar
        _release()
    return [
        ExplainRecord(text, pos, token, e.text, e.closed, f, c)
        for (text, pos, token), e, f, c in zip(sites, explanations, fve, cos, strict=True)
    ]


def explain(
    texts: list[str] | str,
    positions: Positions = None,
    av_dir: str | Path | None = None,
    ar_dir: str | Path | None = None,
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    temperature: float = 0.0,
    device: str = "auto",
    max_tokens: int = 512,
) -> list[ExplainRecord]:
    """Explain the activations of `texts` at `positions` (None: last token, 'all': every token, or a list
    of indices applied to every text; negative from the end). Greedy by default; FVE when `ar_dir` is given."""
    from nla.sidecar import read_sidecar

    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise NLAError("no text to explain; pass at least one string")
    av_dir, ar_dir = _pick(av_dir, ar_dir)
    av_meta = read_sidecar(av_dir)
    if av_meta.get("role") != "av":
        raise NLAError(f"{av_dir} is not an AV checkpoint (role {av_meta.get('role')!r}); pass the AV folder")
    vectors, sites = subject_activations(
        av_meta, texts, positions, device=device, batch_size=batch_size, max_tokens=max_tokens
    )
    return _verbalize(
        vectors,
        sites,
        av_dir,
        ar_dir,
        device=device,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )


def load_vectors(path: str | Path, key: str | None = None) -> torch.Tensor:
    """(N, d) float32 from .npy, .pt/.pth, .safetensors (a tensor, or `key` of a dict) or an activations .parquet."""
    path = Path(path)
    if not path.is_file():
        raise NLAError(f"vector file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        data = torch.from_numpy(np.load(path))
    elif suffix in (".pt", ".pth"):
        data = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    elif suffix == ".parquet":
        from nla.io import read_table, vectors_of

        data = torch.from_numpy(vectors_of(read_table(path, columns=[key or "vector"]), key or "vector"))
    else:
        raise NLAError(f"{path}: unknown vector file type {suffix!r}; use .npy, .pt, .safetensors or .parquet")
    if isinstance(data, dict):
        tensors = {k: v for k, v in data.items() if torch.is_tensor(v)}
        if key is None and len(tensors) != 1:
            raise NLAError(f"{path} holds tensors {sorted(tensors)}; name the one to explain (key=...)")
        if key is not None and key not in tensors:
            raise NLAError(f"{path} has no tensor {key!r}; it holds {sorted(tensors)}")
        data = tensors[key] if key is not None else next(iter(tensors.values()))
    if not torch.is_tensor(data) or data.ndim not in (1, 2):
        raise NLAError(f"{path}: expected a (d,) or (N, d) tensor, got {getattr(data, 'shape', type(data))}")
    return (data[None] if data.ndim == 1 else data).float()


def explain_vectors(
    vector_file: str | Path,
    av_dir: str | Path | None = None,
    ar_dir: str | Path | None = None,
    *,
    key: str | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    temperature: float = 0.0,
    device: str = "auto",
) -> list[ExplainRecord]:
    """Explain saved activation vectors (they must come from the AV's model and layer K)."""
    av_dir, ar_dir = _pick(av_dir, ar_dir)
    vectors = load_vectors(vector_file, key)
    sites = [(None, None, None)] * len(vectors)
    return _verbalize(
        vectors,
        sites,
        av_dir,
        ar_dir,
        device=device,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )


def format_records(records: list[ExplainRecord]) -> str:
    """Human-readable lines for the CLI: position, token, FVE, explanation."""
    lines = []
    for i, r in enumerate(records):
        where = f"[{r.position}] {r.token!r}" if r.position is not None else f"vector {i}"
        score = f"  FVE {r.fve:+.3f}" if r.fve is not None else ""
        cap = "" if r.closed else "  (hit the token cap)"
        lines.append(f"{where}{score}{cap}\n  {r.explanation}")
    return "\n".join(lines)
