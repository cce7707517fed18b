"""The marker token and the two ways of writing an activation vector into the AV.

The AV prompt holds one marker token per vector (``<concept>{marker}</concept>``). A marker
is the first codepoint of the configured ranges that the tokenizer encodes as exactly one
non-special token; its left and right neighbour ids in the canonical prompt are recorded
("neighbour anchoring"), and a position only counts as a site when both neighbours match.

`ActivationInjector` is attached once per model; ``with injector.bound(vectors): ...`` sets
one vector per site (row-major, usually one per row) for the forwards inside the block and
clears them on exit, even on error (TransformerLens' ``with model.hooks(...)``). The
injector is strict: a forward whose ``input_ids`` hold anchored marker sites while nothing
is bound raises, so a direct ``model.generate`` can never silently run without the vector. Sites are found from ``input_ids`` inside every forward by
a hook on the input embedding, so the same code serves SFT, generation (prefill only: decode
steps have no sites), log-prob passes and evaluation. The formulas, with ``u = v / ‖v‖``:

* ``replace``:  e_p  ← α · u                  (the embedding at the marker, input of block 0)
* ``karvonen``: h_p  ← h_p + ‖h_p‖ · u          (output of decoder block ``karvonen_block``)

``replace`` writes into the *output* of the input-embedding module, i.e. the input of block
0. Models that scale embeddings inside that module (Gemma: × √d) have already scaled the
output, so the block-0 input at the marker is exactly ``α · u`` for every architecture.

Gradient checkpointing: transformers checkpoints a block's ``forward``, not its hooks, so
the Karvonen addition runs once, outside the checkpoint, and autograd differentiates it
like any op; if a wrapper did re-run the hook, it would re-apply the same stored sites.
A forward that bypasses the embedding (``inputs_embeds``) while vectors are bound raises
instead of silently running without injection.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from nla.errors import NLAError
from nla.metrics import unit
from nla.models import decoder_blocks, input_embeddings

InjectionMode = Literal["replace", "karvonen"]


@dataclass(frozen=True)
class Marker:
    char: str
    token_id: int
    left_id: int
    right_id: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Marker:
        return cls(str(data["char"]), int(data["token_id"]), int(data["left_id"]), int(data["right_id"]))


def single_token_id(tokenizer, char: str) -> int | None:
    """The id of `char` if the tokenizer encodes it alone as exactly one non-special token."""
    ids = tokenizer.encode(char, add_special_tokens=False)
    if len(ids) != 1 or ids[0] in set(tokenizer.all_special_ids):
        return None
    return ids[0]


_MARKER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {ranges: char}


def choose_marker_char(tokenizer, ranges, marker_char: str | None = None) -> str:
    """The configured marker, or the first single-token codepoint of `ranges` (cached per tokenizer)."""
    if marker_char is not None:
        if single_token_id(tokenizer, marker_char) is None:
            raise NLAError(
                f"marker {marker_char!r} is not a single token for this tokenizer; "
                "set injection.marker_char to null to pick one automatically"
            )
        return marker_char
    key = tuple((int(lo), int(hi)) for lo, hi in ranges)
    cache = _MARKER_CACHE.setdefault(tokenizer, {})
    if key in cache:
        return cache[key]
    for lo, hi in key:
        for cp in range(lo, hi + 1):
            if single_token_id(tokenizer, chr(cp)) is not None:
                cache[key] = chr(cp)
                return chr(cp)
    spans = ", ".join(f"U+{lo:04X}-U+{hi:04X}" for lo, hi in ranges)
    raise NLAError(f"no codepoint in {spans} is a single token for this tokenizer; set injection.marker_char")


def anchor_marker(tokenizer, char: str, canonical_prompt_ids: list[int]) -> Marker:
    """Record the marker's id and its neighbours in the canonical AV prompt."""
    token_id = single_token_id(tokenizer, char)
    if token_id is None:
        raise NLAError(f"marker {char!r} is not a single token for this tokenizer; set injection.marker_char to null")
    positions = [i for i, t in enumerate(canonical_prompt_ids) if t == token_id]
    if len(positions) != 1:
        raise NLAError(
            f"the AV prompt must contain the marker {char!r} exactly once as its own token (found {len(positions)}); "
            "keep '{marker}' in prompts.av_user between non-letter characters"
        )
    p = positions[0]
    if p == 0 or p == len(canonical_prompt_ids) - 1:
        raise NLAError("the marker must not be the first or last token of the AV prompt; add text around '{marker}'")
    return Marker(char, token_id, canonical_prompt_ids[p - 1], canonical_prompt_ids[p + 1])


def find_sites(input_ids: torch.Tensor, marker: Marker) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of anchored marker sites, row-major. Needs both neighbours to match."""
    ids = input_ids
    if ids.shape[1] < 3:
        empty = torch.empty(0, dtype=torch.long, device=ids.device)
        return empty, empty
    hit = ids[:, 1:-1] == marker.token_id
    hit &= ids[:, :-2] == marker.left_id
    hit &= ids[:, 2:] == marker.right_id
    rows, cols = hit.nonzero(as_tuple=True)
    return rows, cols + 1


def inject_replace(embeds: torch.Tensor, rows, cols, vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """e_p ← α · v/‖v‖ at each site (out of place, so autograd and hooks stay intact)."""
    new = (scale * unit(vectors.float())).to(embeds.dtype)
    return embeds.index_put((rows, cols), new)


def inject_karvonen(hidden: torch.Tensor, rows, cols, vectors: torch.Tensor) -> torch.Tensor:
    """h_p ← h_p + ‖h_p‖ · v/‖v‖ at each site (norm-matched additive steering)."""
    h = hidden[rows, cols]
    new = h + (h.float().norm(dim=-1, keepdim=True) * unit(vectors.float())).to(h.dtype)
    return hidden.index_put((rows, cols), new)


class ActivationInjector:
    """Hooks that write bound vectors into every AV forward. Attach once, bind per batch.

    `n_injections` counts forwards that wrote vectors (prefill yes, decode steps no): a
    cheap way for tests and logs to see where injection happened.
    """

    def __init__(
        self,
        model: nn.Module,
        marker: Marker,
        mode: InjectionMode,
        scale: float | None = None,
        karvonen_block: int = 1,
        *,
        strict: bool = True,
    ):
        if mode not in ("replace", "karvonen"):
            raise NLAError(f"unknown injection mode {mode!r}; use 'replace' or 'karvonen'")
        if mode == "replace" and scale is None:
            raise NLAError("injection.scale is required for mode 'replace'; run `nla sweep-alpha` or set it")
        blocks = decoder_blocks(model)
        if mode == "karvonen" and not 0 <= karvonen_block < len(blocks):
            raise NLAError(
                f"injection.karvonen_block={karvonen_block} is out of range for {len(blocks)} blocks; "
                f"set it to 0..{len(blocks) - 1}"
            )
        self.marker, self.mode, self.scale, self.karvonen_block = marker, mode, scale, karvonen_block
        self.strict = strict
        self.vectors: torch.Tensor | None = None
        self.n_injections = 0
        self._sites: tuple[torch.Tensor, torch.Tensor] | None = None
        self._model = model
        self._handles: list = []
        self._attach()

    def _attach(self) -> None:
        model = self._model
        self._handles = [
            model.register_forward_pre_hook(self._on_model, with_kwargs=True),
            input_embeddings(model).register_forward_hook(self._on_embeddings),
        ]
        if self.mode == "karvonen":
            self._handles.append(decoder_blocks(model)[self.karvonen_block].register_forward_hook(self._on_block))

    def like(self, model: nn.Module) -> ActivationInjector:
        """A new injector with this one's marker, mode and scale, hooked into `model` (e.g. a copy)."""
        return ActivationInjector(model, self.marker, self.mode, self.scale, self.karvonen_block, strict=self.strict)

    @contextmanager
    def detached(self):
        """The model without these hooks for the duration (to deep-copy it without them), re-hooked after."""
        self.remove()
        try:
            yield
        finally:
            self._attach()

    @contextmanager
    def bound(self, vectors: torch.Tensor):
        """Inject `vectors` (one per marker site, row-major) in every forward inside the block."""
        self.bind(vectors)
        try:
            yield self
        finally:
            self.bind(None)

    def bind(self, vectors: torch.Tensor | None) -> None:
        """Set (or with None clear) the vectors for the next forwards; prefer the scoped `bound`.

        The SFT trainer binds per batch inside `compute_loss` (its backward runs after the call
        returns); everything else uses `bound`.
        """
        if vectors is not None:
            if vectors.ndim != 2:
                raise NLAError(f"vectors must be a 2-D (n, d_model) tensor, got shape {tuple(vectors.shape)}")
            bad = (~torch.isfinite(vectors).all(dim=1)).nonzero().flatten().tolist()
            if bad:
                raise NLAError(
                    f"vectors hold NaN or Inf in rows {bad[:5]}; check where they came from "
                    "(fp16 overflow: extract in float32)"
                )
        self.vectors = None if vectors is None else vectors.detach()
        self._sites = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_model(self, module, args, kwargs):
        if self.vectors is not None and kwargs.get("inputs_embeds") is not None:
            raise NLAError("AV forward with inputs_embeds: injection needs input_ids to find marker sites")

    def _on_embeddings(self, module, inputs, output):
        input_ids = inputs[0] if inputs else None
        if self.vectors is None:
            if self.strict and torch.is_tensor(input_ids) and find_sites(input_ids, self.marker)[0].numel():
                raise NLAError(
                    "an AV forward holds marker sites but no vectors are bound; "
                    "wrap it in `with injector.bound(vectors):` (or construct the injector with strict=False)"
                )
            return None
        if input_ids is None or not torch.is_tensor(input_ids) or input_ids.dtype not in (torch.long, torch.int):
            raise NLAError("AV forward without input_ids: injection needs token ids to find marker sites")
        rows, cols = find_sites(input_ids, self.marker)
        if rows.numel() == 0 and input_ids.shape[1] == 1:
            self._sites = None  # a decode step: the prompt (and its sites) is already in the KV cache
            return None
        if rows.numel() != self.vectors.shape[0]:
            raise NLAError(
                f"found {rows.numel()} marker sites for {self.vectors.shape[0]} vectors; "
                "each AV prompt must hold the anchored marker exactly once per vector"
            )
        if self.vectors.shape[1] != output.shape[-1]:
            raise NLAError(
                f"vectors have d={self.vectors.shape[1]} but the model has d_model={output.shape[-1]}; "
                "use activations extracted from this AV's base model and layer"
            )
        self._sites = (rows, cols)
        self.n_injections += 1
        if self.mode == "replace":
            return inject_replace(output, rows, cols, self.vectors.to(output.device), float(self.scale))
        return None

    def _on_block(self, module, inputs, output):
        if self.vectors is None or self._sites is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = inject_karvonen(hidden, *self._sites, self.vectors.to(hidden.device))
        return (new, *output[1:]) if isinstance(output, tuple) else new
