"""The public Python API: one object that holds an NLA and runs its three directions.

    from nla import NLA
    nla = NLA.load(av="data/checkpoints/rl/av", ar="data/checkpoints/rl/ar")
    v = nla.activations(["The Eiffel Tower is in"], positions=[-1])   # (n, d) at the sidecar's layer
    texts = nla.verbalize(v)                                          # list[str], greedy by default
    v_hat = nla.reconstruct(texts)                                    # (n, d)
    nla.fve(v, v_hat)                                                 # (n,) per-row FVE

Checkpoints are folders or Hub ids, in this project's format or a public one (nanoNLA, the
paper's release: `nla.interop`). The subject model (for `activations`) is the base model named
in the AV's sidecar, read up to the sidecar's layer K and never further; it loads on first use. The AV and AR load once
and stay resident. The CLI's `nla explain` and `nla.explain.explain` are thin callers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from nla.ar import AR
from nla.av import AV, Explanation
from nla.data import pad_batch
from nla.errors import NLAError
from nla.interop import load_any_ar, load_any_av
from nla.metrics import mse_nrm
from nla.models import context_length, load_model, residual_at
from nla.sidecar import base_model_config, require

log = logging.getLogger(__name__)

Positions = list[int] | Literal["all"] | None


@dataclass(frozen=True)
class Site:
    """Where a vector was read: the text, the token index in it, and the token."""

    text: str
    position: int
    token: str


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


def check_texts(texts: list[str]) -> None:
    """Refuse empty texts (no token to explain) and non-strings before any model loads."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise NLAError(f"text {i} is a {type(text).__name__}, not a string; pass texts as str")
        if not text:
            raise NLAError(f"text {i} is empty; pass some text to explain")


def text_window(
    ids: list[int], wanted: list[int], width: int, has_head: bool, index: int, positions: Positions
) -> tuple[list[int], int, list[int]]:
    """What the model reads of one text: (token ids, shift, the positions kept).

    The model reads the text up to its last wanted position. When that is more than `width`
    tokens, it reads the `width` tokens that end there (a token's activation depends only on the
    tokens before it), its leading special token (BOS) kept in front; position p of the text is
    index p - shift of what it reads. With positions='all', positions before the window are
    dropped; one asked for by index there is refused.
    """
    head = int(has_head)
    end = max(wanted) + 1
    first = max(end - (width - head), head)  # the first position of the text inside the window
    early = [p for p in wanted if p < first]
    if early and positions != "all":
        raise NLAError(
            f"position {early[0]} of text {index} is outside its {width}-token window (positions {first}..{end - 1}, "
            f"ending at the last one asked for); ask for positions fewer than {width} tokens apart, or raise "
            "max_tokens (at most the model's context)"
        )
    return ids[:head] + ids[first:end], first - head, [p for p in wanted if p >= first]


@dataclass
class NLA:
    """An AV (vector → text), optionally an AR (text → vector), and their subject model."""

    av: AV
    ar: AR | None = None
    device: str = "auto"
    _subject: tuple | None = field(default=None, init=False, repr=False)  # (model, tokenizer), loaded lazily

    @classmethod
    def load(
        cls,
        av: str | Path,
        ar: str | Path | None = None,
        *,
        device: str = "auto",
        injection: str | None = None,
        dtype: str | None = None,
    ) -> NLA:
        """Load checkpoint folders or Hub ids; refuses (NLAError) an AR trained for another model or layer.

        `injection` ('replace' | 'karvonen') overrides the AV's recorded or inferred mode; `dtype`
        ('bfloat16', 'float32', ...) the sidecar's (auto: bf16 on a GPU, float32 on the CPU).
        """
        av_model = load_any_av(av, device, injection=injection, dtype=dtype)
        ar_model = load_any_ar(ar, device, dtype=dtype) if ar is not None else None
        if ar_model is not None:
            require(
                ar_model.meta,
                where=str(ar),
                fingerprint=av_model.meta.get("base_model_fingerprint"),
                d_model=av_model.meta["d_model"],
                layer=av_model.meta["layer"],
            )
        return cls(av_model, ar_model, device)

    @property
    def layer(self) -> int:
        return int(self.av.meta["layer"])

    def subject(self) -> tuple:
        """(model, tokenizer) of the subject model, loaded on first use and kept."""
        if self._subject is None:
            model, tokenizer, source = load_model(base_model_config(self.av.meta, self.device))
            require(self.av.meta, where="the AV", fingerprint=source.fingerprint)
            self._subject = (model.eval(), tokenizer)
        return self._subject

    @torch.no_grad()
    def read(
        self, texts: list[str], positions: Positions = None, *, max_tokens: int = 512, batch_size: int = 16
    ) -> tuple[torch.Tensor, list[Site]]:
        """Residual vectors at the AV's layer for the requested positions: ((N, d) float32 cpu, sites).

        Texts stream through in batches: each batch is tokenized, read, and only its (k, d) vectors
        are kept, so memory does not grow with the number of texts. A text longer than the window
        (`max_tokens`, at most the model's context) is read through the window that ends at its
        last requested position (`text_window`), with a warning; sites keep the full text's positions.
        """
        check_texts(texts)
        model, tokenizer = self.subject()
        width = min(max_tokens, context_length(model) or max_tokens)
        special_ids = set(tokenizer.all_special_ids)
        device = next(model.parameters()).device
        vectors, sites, windowed = [], [], []
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], add_special_tokens=True)["input_ids"]
            rows, picks = [], []  # picks: (batch row, index in what the model reads)
            for r, ids in enumerate(encoded):
                if not ids:
                    raise NLAError(f"text {start + r} has no tokens; pass some text to explain")
                wanted = resolve_positions(len(ids), positions, [t in special_ids for t in ids])
                read, shift, wanted = text_window(ids, wanted, width, ids[0] in special_ids, start + r, positions)
                if shift:
                    windowed.append(start + r)
                rows.append(read)
                picks += [(r, p - shift) for p in wanted]
                sites += [Site(texts[start + r], p, tokenizer.decode([ids[p]])) for p in wanted]
            if not picks:
                continue
            ids, mask = pad_batch(rows, tokenizer.pad_token_id)  # (b, longest), right-padded
            hidden = residual_at(model, self.layer, ids.to(device), mask.to(device))  # (b, T, d)
            at = torch.tensor(picks, device=device)  # (k, 2)
            vectors.append(hidden[at[:, 0], at[:, 1]].float().cpu())  # (k, d): a copy, so `hidden` is freed
        if windowed:
            log.warning(
                "%d of %d texts are longer than the %d-token window (max_tokens, at most the model's context); "
                "each was read through the %d tokens ending at its last explained position, e.g. text %d",
                len(windowed),
                len(texts),
                width,
                width,
                windowed[0],
            )
        if not sites:
            raise NLAError("no token positions to explain (every token is special); pass longer text")
        return torch.cat(vectors), sites

    def activations(self, texts: list[str] | str, positions: Positions = None, **kwargs) -> torch.Tensor:
        """(N, d) residual vectors at the sidecar's layer; positions as in `resolve_positions`."""
        return self.read([texts] if isinstance(texts, str) else list(texts), positions, **kwargs)[0]

    def explanations(
        self, vectors: torch.Tensor, *, max_new_tokens: int = 48, temperature: float = 0.0, batch_size: int = 16
    ) -> list[Explanation]:
        """The AV's explanation of each vector, with its token ids and whether it closed before the cap."""
        return self.av.generate(vectors, max_new_tokens, temperature=temperature, batch_size=batch_size)

    def verbalize(self, vectors: torch.Tensor, **kwargs) -> list[str]:
        """One explanation text per vector (greedy unless temperature > 0)."""
        return [e.text for e in self.explanations(vectors, **kwargs)]

    def reconstruct(self, texts: list[str], *, batch_size: int = 32) -> torch.Tensor:
        """(N, d) float32: the AR's reconstruction of each explanation."""
        if self.ar is None:
            raise NLAError("this NLA has no AR; load it with NLA.load(av=..., ar=...) to reconstruct")
        return self.ar.reconstruct(list(texts), batch_size)

    def fve(self, vectors: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-row FVE 1 − mse_nrm / mean ‖u − ū‖², against the AR's training reference."""
        if self.ar is None or self.ar.fve_denominator is None:
            raise NLAError("per-row FVE needs an AR with its FVE reference; pass one trained by `nla ar-sft`")
        return 1 - mse_nrm(reconstructions, vectors) / self.ar.fve_denominator
