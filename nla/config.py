"""Typed configuration for every stage, loaded from `params.yaml`.

One pydantic model per stage, all with defaults sized for the embedded CPU run. Unknown or
mistyped keys are rejected (``extra="forbid"``) so a typo can never silently fall back to
a default. Profiles (``profiles/<name>.yaml``) are partial overlays merged on top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = "params.yaml"
PROFILE_DIR = "profiles"


class NLAError(RuntimeError):
    """A user-facing error: one line that names the problem and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Which subject model, where to read it, and which layer."""

    name: str = "embedded"  # "embedded" | HF hub id | local directory | path to a .gguf file
    gguf_file: str | None = None  # file name inside `name` when it is a directory/repo of GGUFs
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # "auto" picks cuda when present
    layer: int = Field(20, ge=0)  # K: output of decoder block K (= hidden_states[K+1])
    trust_remote_code: bool = False


class CorpusConfig(Section):
    source: str = "embedded"  # "embedded" | path to .txt/.jsonl/.parquet | "hf:<dataset id>"
    text_field: str = "text"
    hf_split: str = "train"
    hf_config: str | None = None
    max_docs: int = Field(300, ge=1)
    min_chars: int = Field(200, ge=1)
    max_chars: int = Field(20_000, ge=1)


class ExtractConfig(Section):
    max_tokens: int = Field(128, ge=8)  # documents are truncated to this many tokens
    positions_per_doc: int = Field(3, ge=1)
    min_position: int = Field(8, ge=0)  # never sample the first few tokens
    batch_size: int = Field(16, ge=1)
    shard_docs: int = Field(64, ge=1)  # documents per resumable shard
    seed: int = 0


class SplitConfig(Section):
    fractions: dict[str, float] = Field(
        default_factory=lambda: {"av_sft": 0.45, "ar_sft": 0.25, "rl": 0.15, "eval": 0.15}
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check_fractions(self) -> SplitConfig:
        expected = {"av_sft", "ar_sft", "rl", "eval"}
        if set(self.fractions) != expected:
            raise ValueError(f"split.fractions must have exactly the keys {sorted(expected)}")
        if any(f < 0 for f in self.fractions.values()) or abs(sum(self.fractions.values()) - 1) > 1e-6:
            raise ValueError("split.fractions must be non-negative and sum to 1")
        return self


class OpenAIBackendConfig(Section):
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"  # the key itself is read from this variable only
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0)


class LabelConfig(Section):
    backend: Literal["local", "openai", "baseline"] = "local"
    local_model: str = "embedded"  # model for the local backend (same forms as model.name)
    splits: list[str] = Field(default_factory=lambda: ["av_sft", "ar_sft", "eval"])
    context_tokens: int = Field(64, ge=1)  # how much of the prefix the labeler sees
    max_new_tokens: int = Field(64, ge=8)
    temperature: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    min_features: int = Field(2, ge=1)
    cache_dir: str = "data/cache/label"
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig)


class QualityConfig(Section):
    norm_quantile_low: float = Field(0.001, ge=0, le=1)
    norm_quantile_high: float = Field(0.999, ge=0, le=1)
    norm_margin: float = Field(0.5, ge=0)  # bounds widened by this fraction of the range
    min_explanation_tokens: int = Field(4, ge=1)
    max_explanation_tokens: int = Field(160, ge=1)
    max_duplicate_rate: float = Field(0.5, ge=0, le=1)
    min_features: int = Field(2, ge=1)


class InjectionConfig(Section):
    mode: Literal["replace", "karvonen"] = "replace"
    scale: float | None = Field(None, gt=0)  # alpha for `replace`; None: 75th pct of norms
    karvonen_block: int = Field(1, ge=0)  # Karvonen adds at the output of this block
    marker_char: str | None = None  # None: first single-token codepoint of marker_ranges
    marker_ranges: list[tuple[int, int]] = Field(
        default_factory=lambda: [(0x3200, 0x33FF), (0x2500, 0x25FF)]
    )


class LoraConfig(Section):
    enabled: bool = True  # False: full fine-tuning
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, le=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class AVSFTConfig(Section):
    lora: LoraConfig = Field(default_factory=LoraConfig)
    learning_rate: float = Field(5e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    gradient_checkpointing: bool = False
    merge: bool = False  # also save merged full weights
    seed: int = 0
    alpha_sweep: list[float] = Field(default_factory=list)  # empty: no sweep


class ARSFTConfig(Section):
    lora: LoraConfig = Field(default_factory=LoraConfig)
    learning_rate: float = Field(5e-4, gt=0)
    head_learning_rate: float = Field(1e-3, gt=0)
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(16, ge=1)
    gradient_checkpointing: bool = False
    seed: int = 0


class RLConfig(Section):
    steps: int = Field(20, ge=0)
    prompts_per_step: int = Field(4, ge=1)
    group_size: int = Field(4, ge=2)
    actor_learning_rate: float = Field(1e-4, gt=0)
    ar_learning_rate: float = Field(1e-4, gt=0)
    beta: float = Field(0.02, ge=0)  # KL(k3) weight to the frozen SFT AV
    epsilon: float = Field(0.2, gt=0)  # clip range of the policy ratio
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, ge=4)
    length_cap_penalty: float = Field(0.5, ge=0)  # subtracted when an explanation hits the cap
    per_token_penalty: float = Field(0.0, ge=0)
    reward: Literal["neg_mse", "neg_log_mse"] = "neg_mse"
    malformed_reward: float = -2.0
    eval_every: int = Field(10, ge=1)
    eval_rows: int = Field(32, ge=1)
    checkpoint_every: int = Field(5, ge=1)
    seed: int = 0


class EvaluateConfig(Section):
    max_rows: int = Field(128, ge=1)
    max_new_tokens: int = Field(48, ge=4)
    batch_size: int = Field(16, ge=1)
    n_samples: int = Field(20, ge=0)


class PublishConfig(Section):
    enabled: bool = False  # dry run by default: build folders, upload nothing
    repo_prefix: str = "nla"
    namespace: str | None = None
    private: bool = True
    token_env: str = "HF_TOKEN"
    merge_weights: bool = True


class PromptConfig(Section):
    """Prompt templates; recorded verbatim in every sidecar."""

    av_user: str = (
        "Here is an activation vector from a language model: <concept>{marker}</concept>\n"
        "Explain in plain English what the model was reading and predicting at that point."
    )
    av_answer_open: str = "<explanation>"  # prefilled: the AV writes the explanation right after it
    av_answer_close: str = "</explanation>"
    ar_template: str = "Explanation of a language model's internal state: {explanation}\nThe state:"

    @model_validator(mode="after")
    def _check_slots(self) -> PromptConfig:
        if self.av_user.count("{marker}") != 1:
            raise ValueError("prompts.av_user must contain '{marker}' exactly once")
        if self.ar_template.count("{explanation}") != 1:
            raise ValueError("prompts.ar_template must contain '{explanation}' exactly once")
        return self


class NLAConfig(Section):
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    injection: InjectionConfig = Field(default_factory=InjectionConfig)
    av_sft: AVSFTConfig = Field(default_factory=AVSFTConfig)
    ar_sft: ARSFTConfig = Field(default_factory=ARSFTConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the project root (dvc.yaml uses the same)."""

    documents: str = "data/corpus/documents.parquet"
    activations: str = "data/activations"
    splits: str = "data/split"
    labels: str = "data/labels"
    av_sft: str = "data/checkpoints/av_sft"
    ar_sft: str = "data/checkpoints/ar_sft"
    rl: str = "data/checkpoints/rl"
    quality: str = "reports/quality"
    metrics: str = "metrics"
    plots: str = "plots"
    reports: str = "reports"
    publish: str = "data/publish"
    work: str = "data/work"


PATHS = Paths()


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `overlay` into a copy of `base` (overlay wins)."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise NLAError(f"{path}: file not found; run from the project root or pass --params") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NLAError(f"{path}: not valid YAML ({first}); fix the syntax") from None
    if not isinstance(data, dict):
        raise NLAError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per ValidationError, naming the dotted key and what to do."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'; check its spelling against params.yaml"
    return f"{source}: invalid value for '{key}': {first['msg']}; fix it in {source}"


def config_from_dict(data: dict[str, Any], source: str = "params") -> NLAConfig:
    try:
        return NLAConfig.model_validate(data)
    except ValidationError as err:
        raise NLAError(format_validation_error(err, source)) from None


def load_config(params_path: str | os.PathLike = PARAMS_FILE, profile: str | None = None) -> NLAConfig:
    """Load params.yaml, optionally overlaid with profiles/<profile>.yaml."""
    params_path = Path(params_path)
    data = _read_yaml(params_path)
    if profile:
        profile_path = params_path.parent / PROFILE_DIR / f"{profile}.yaml"
        if not profile_path.exists():
            raise NLAError(f"profile '{profile}' not found at {profile_path}; use one of {list_profiles(params_path.parent)}")
        data = deep_merge(data, _read_yaml(profile_path))
    return config_from_dict(data, str(params_path) + (f" + profile {profile}" if profile else ""))


def list_profiles(root: str | os.PathLike = ".") -> list[str]:
    return sorted(p.stem for p in (Path(root) / PROFILE_DIR).glob("*.yaml"))
