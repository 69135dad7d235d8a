"""A problem (question and normalised gold answer) and the prompt built from it; the `prompt` config group."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ctt.settings import Settings

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class Problem(NamedTuple):
    # A NamedTuple, not a frozen dataclass: Lightning's precision plugins (DeepSpeed, *-true) rebuild every batch
    # with `apply_to_collection`, which rejects frozen dataclasses and passes named tuples through.
    id: str
    question: str
    answer: str  # normalised gold, ready for ctt.data.answers.verify


def format_user_message(question: str, instruction: str) -> str:
    # str.replace, not str.format: the default instruction contains "\boxed{}" which format() chokes on.
    if "{question}" in instruction:
        return instruction.replace("{question}", question)
    return f"{question}\n\n{instruction}"


def build_prompt_ids(tokenizer: Any, question: str, instruction: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    user = format_user_message(question, instruction)
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    else:
        text = (f"{system_prompt}\n\n" if system_prompt else "") + f"{user}\n"
        ids = tokenizer.encode(text)
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # batched form of a single conversation
        ids = ids[0]
    return [int(i) for i in ids]


@dataclass(frozen=True)
class PromptSettings(Settings):
    """The `prompt` config group: what is said around every question."""

    section: ClassVar[str] = "prompt"

    instruction: str | None = None  # null: DEFAULT_INSTRUCTION
    system_prompt: str | None = None

    @property
    def text(self) -> str:
        return self.instruction or DEFAULT_INSTRUCTION
