"""Prompt rendering and tokenization through the HF tokenizer."""
from __future__ import annotations

from typing import Any

from .rows import DataError, PromptRow

__all__ = ["check_tokenizer", "encode_prompt"]


def check_tokenizer(tokenizer: Any, chat_template: bool) -> None:
    """Refuse a tokenizer that cannot render chat prompts before any row is read."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.chat_template=True: the tokenizer has no chat template; set "
                        "data.chat_template=false or use a tokenizer that ships one")


def encode_prompt(tokenizer: Any, row: PromptRow, chat_template: bool) -> tuple[str, list[int]]:
    """(rendered text, token ids) of the prompt the policy continues.

    With the chat template, a plain ``prompt`` becomes one user turn and the template's
    generation prompt (the assistant header) is appended, so the response starts right after.
    The template already holds any BOS, so the rendered text is encoded without special tokens.
    """
    if chat_template:
        messages = row.messages or [{"role": "user", "content": row.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        if row.messages is not None:
            raise ValueError("'messages' rows need data.chat_template=true")
        text = row.prompt
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return text, list(ids)
