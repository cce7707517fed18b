"""`nla explain`: text (or saved vectors) → activation at the AV's layer → explanation → round-trip FVE.

A thin caller of `nla.api.NLA`: the subject model named in the AV's sidecar is read up to its
layer K (never a hard-coded layer), the AV writes one greedy explanation per vector, and, when
an AR is given, each vector is reconstructed from its explanation and scored per row against
the AR's training reference (1 − mse_nrm / mean ‖u − ū‖² of its training rows). Public ARs
ship no training reference, so their rows carry the cosine only. Each record keeps the
generated token ids and the decoded text they were parsed from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from nla.api import NLA, Positions, Site, check_texts
from nla.config import PATHS
from nla.data import vectors_of
from nla.errors import NLAError
from nla.io import read_table
from nla.metrics import cosine


@dataclass(frozen=True)
class ExplainRecord:
    text: str | None  # the input text (None for vectors from a file)
    position: int | None  # token index in the text (None for vectors from a file)
    token: str | None
    explanation: str
    closed: bool  # the AV closed its answer before the token cap
    fve: float | None  # round-trip FVE of this vector (needs an AR with its training reference)
    cos: float | None  # cosine of the AR's reconstruction with the vector (needs an AR)
    token_ids: list[int] | None = None  # the AV's completion as generated, up to its first EOS
    raw: str | None = None  # that completion decoded, before the explanation was parsed out

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


def load_nla(
    av_dir: str | Path | None = None,
    ar_dir: str | Path | None = None,
    *,
    device: str = "auto",
    injection: str | None = None,
    dtype: str | None = None,
) -> NLA:
    """The NLA `explain` uses: the named checkpoints (folders or Hub ids, any format) or the default pair."""
    return NLA.load(*_pick(av_dir, ar_dir), device=device, injection=injection, dtype=dtype)


def to_records(
    nla: NLA,
    vectors: torch.Tensor,
    sites: list[Site | None],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
) -> list[ExplainRecord]:
    """Explain `vectors` with `nla` and score each round trip when it has an AR."""
    explanations = nla.explanations(
        vectors, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size
    )
    fve = cos = [None] * len(explanations)
    if nla.ar is not None:
        v_hat = nla.reconstruct([e.text for e in explanations], batch_size=batch_size)
        if nla.ar.fve_denominator is not None:  # public ARs ship no training reference
            fve = nla.fve(vectors, v_hat).tolist()
        cos = cosine(v_hat, vectors).tolist()
    return [
        ExplainRecord(
            site.text if site else None,
            site.position if site else None,
            site.token if site else None,
            e.text,
            e.closed,
            f,
            c,
            list(e.token_ids),
            e.raw,
        )
        for site, e, f, c in zip(sites, explanations, fve, cos, strict=True)
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
    nla: NLA | None = None,
) -> list[ExplainRecord]:
    """Explain the activations of `texts` at `positions` (None: last token, 'all': every token, or a list
    of indices applied to every text; negative from the end). Greedy by default; FVE when an AR is given.
    `nla`: an already loaded NLA (`load_nla`), used instead of `av_dir`/`ar_dir`."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise NLAError("no text to explain; pass at least one string")
    check_texts(texts)  # before the models load
    nla = nla or load_nla(av_dir, ar_dir, device=device)
    vectors, sites = nla.read(texts, positions, max_tokens=max_tokens, batch_size=batch_size)
    return to_records(
        nla, vectors, sites, batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature
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
        data = load_file(str(path))
    elif suffix == ".parquet":
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
    data = (data[None] if data.ndim == 1 else data).float()
    bad = (~torch.isfinite(data).all(dim=1)).nonzero().flatten().tolist()
    if bad:  # before the models load; the injector refuses them too, for vectors from the Python API
        raise NLAError(f"{path}: vectors hold NaN or Inf in rows {bad[:5]}; check where they came from")
    return data


def explain_vectors(
    vector_file: str | Path | torch.Tensor,
    av_dir: str | Path | None = None,
    ar_dir: str | Path | None = None,
    *,
    key: str | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    temperature: float = 0.0,
    device: str = "auto",
    nla: NLA | None = None,
) -> list[ExplainRecord]:
    """Explain saved activation vectors (they must come from the AV's model and layer K); `nla` as in `explain`.
    `vector_file` may also be the (N, d) tensor `load_vectors` returned, so a caller can check the file first."""
    vectors = vector_file if torch.is_tensor(vector_file) else load_vectors(vector_file, key)
    nla = nla or load_nla(av_dir, ar_dir, device=device)
    return to_records(
        nla,
        vectors,
        [None] * len(vectors),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )


def format_records(records: list[ExplainRecord]) -> str:
    """Human-readable lines for the CLI: position, token, FVE, explanation."""
    lines = []
    for i, r in enumerate(records):
        where = f"[{r.position}] {r.token!r}" if r.position is not None else f"vector {i}"
        score = f"  FVE {r.fve:+.3f}" if r.fve is not None else f"  cos {r.cos:+.3f}" if r.cos is not None else ""
        cap = "" if r.closed else "  (hit the token cap)"
        lines.append(f"{where}{score}{cap}\n  {r.explanation}")
    return "\n".join(lines)
