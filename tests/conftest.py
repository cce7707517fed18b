"""Shared fixtures: tiny random models of each architecture and the embedded model."""

from __future__ import annotations

import os

# OpenMP threads spin while waiting by default; on a shared 2-core machine that made decode steps ~5x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_reliability import build_data_project, build_sft_project  # noqa: E402

torch.set_num_threads(2)

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
)


def tiny_model(arch: str, seed: int = 0):
    """A randomly initialised causal LM of `arch` (llama | qwen3 | gemma3), float32, eval mode."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(**TINY)
    elif arch == "qwen3":
        config = Qwen3Config(**TINY, head_dim=16)
    elif arch == "gemma3":
        config = Gemma3TextConfig(**TINY, head_dim=16, sliding_window=64)
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(params=["llama", "qwen3", "gemma3"])
def tiny_arch_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer, source) of the embedded SmolLM2-135M-Instruct, loaded once per session."""
    from nla.config import ModelConfig
    from nla.models import load_model

    return load_model(ModelConfig())


# The CLI projects on a tiny model, defined here once: a session fixture imported into several test
# modules would be a separate fixture in each, and be rebuilt once per module.
@pytest.fixture(scope="session")
def data_project(tmp_path_factory):
    return build_data_project(tmp_path_factory)


@pytest.fixture(scope="session")
def sft_project(data_project, tmp_path_factory):
    return build_sft_project(data_project, tmp_path_factory)
