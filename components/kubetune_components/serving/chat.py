"""Chat messages rendered into the prompt the model was fine-tuned on.

A model trained on the `instruction` format sees the instruction template (system messages are the
instruction, the user message the input, earlier turns become worked examples); every other model
sees its tokenizer's chat template. Over-long conversations lose their oldest turns first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from transformers import PreTrainedTokenizerBase

from kubetune_components import data
from kubetune_components.serving.requests import SYSTEM_ROLES, ChatMessage, RequestError

PromptStyle = Literal["chat-template", "instruction"]


def prompt_style(dataset_format: str | None, tokenizer: PreTrainedTokenizerBase) -> PromptStyle | None:
    """How chats are rendered for a model fine-tuned on `dataset_format`; None: it cannot chat."""
    if dataset_format == "instruction":
        return "instruction"
    if getattr(tokenizer, "chat_template", None):
        return "chat-template"
    return None


def render_chat_text(
    messages: Sequence[ChatMessage], style: PromptStyle | None, tokenizer: PreTrainedTokenizerBase
) -> str:
    """The prompt text of a conversation, in the model's `style`."""
    if style is None:
        raise RequestError(
            "this model has no chat template and was not fine-tuned on the instruction format, so it "
            "cannot take chat messages; use /v1/completions",
            param="messages",
            code="chat_not_supported",
        )
    if style == "instruction":
        return render_instruction_chat(messages)
    conversation = [{"role": template_role(m.role), "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # templates raise on conversations they do not accept
        raise RequestError(
            f"the model's chat template rejects these messages: {error}", param="messages"
        ) from error
    return str(text)


def template_role(role: str) -> str:
    return "system" if role in SYSTEM_ROLES else role


def drop_oldest_turn(messages: Sequence[ChatMessage]) -> list[ChatMessage] | None:
    """Without the oldest non-system message (and an assistant reply it leaves orphaned).

    The last message is never dropped; None when nothing else is left to drop.
    """
    candidates = [index for index, m in enumerate(messages[:-1]) if m.role not in SYSTEM_ROLES]
    if not candidates:
        return None
    kept = [m for index, m in enumerate(messages) if index != candidates[0]]
    following = [index for index, m in enumerate(kept[:-1]) if m.role not in SYSTEM_ROLES]
    if following and kept[following[0]].role == "assistant":
        del kept[following[0]]
    return kept


def render_instruction_chat(messages: Sequence[ChatMessage]) -> str:
    """A conversation in the instruction format the model was fine-tuned on.

    System (and developer) messages are the instruction and the last user message its input;
    earlier user/assistant exchanges come first as answered instructions (few-shot examples).
    """
    instruction = "\n\n".join(m.content for m in messages if m.role in SYSTEM_ROLES)
    turns = [m for m in messages if m.role not in SYSTEM_ROLES]
    if not turns or turns[-1].role != "user":
        raise RequestError(
            "this model was fine-tuned on instructions: the last message must be from the user",
            param="messages",
        )

    def block(user_text: str) -> str:
        if instruction:
            return data.render_instruction_prompt(instruction, user_text or None)
        return data.render_instruction_prompt(user_text)

    parts: list[str] = []
    pending: list[str] = []
    for message in turns:
        if message.role == "user":
            pending.append(message.content)
        else:
            parts.append(block("\n\n".join(pending)) + message.content + "\n\n")
            pending = []
    parts.append(block("\n\n".join(pending)))
    return "".join(parts)
