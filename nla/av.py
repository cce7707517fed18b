"""The activation verbalizer (AV): prompt, marker, and injection wiring.

The AV prompt is the chat template's user turn (`prompts.av_user` with the marker in the
vector slot) followed by the generation prompt and the prefilled answer opener, so the AV
writes the explanation directly and closes it with `prompts.av_answer_close`.
"""

from __future__ import annotations

from nla.config import InjectionConfig, PromptConfig
from nla.injection import ActivationInjector, Marker, anchor_marker, choose_marker_char


def av_prompt(tokenizer, prompts: PromptConfig, marker_char: str) -> str:
    """The full AV prompt text (chat template applied, answer opener prefilled)."""
    messages = [{"role": "user", "content": prompts.av_user.format(marker=marker_char)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prompts.av_answer_open


def av_marker(tokenizer, prompts: PromptConfig, injection: InjectionConfig) -> Marker:
    """Choose the marker for this tokenizer and anchor it in the canonical AV prompt."""
    char = choose_marker_char(tokenizer, injection.marker_ranges, injection.marker_char)
    ids = tokenizer(av_prompt(tokenizer, prompts, char), add_special_tokens=False)["input_ids"]
    return anchor_marker(tokenizer, char, ids)


def attach_injector(model, marker: Marker, injection: InjectionConfig, scale: float | None = None) -> ActivationInjector:
    """Hook `model` so every forward writes the bound vectors at anchored marker sites."""
    return ActivationInjector(model, marker, injection.mode, scale if scale is not None else injection.scale,
                              injection.karvonen_block)
