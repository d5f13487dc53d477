"""Chat formatting shared by training and evaluation, so both see exactly the same tokens.

Prompts always go through the tokenizer's own chat template (for SmolLM2 that adds its default system
line). Training examples are tokenized segment by segment -- prompt, then answer -- which is exactly how
a prompt is tokenized at inference time before the model generates the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from souplm.errors import SoupError
from souplm.experiment.multimodal import IMAGE_TOKEN

IGNORE = -100  # label value that the loss skips


def render(tokenizer: object, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template applied to `messages`, as text."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_prompt(tokenizer: object, user_text: str) -> str:
    """Prompt text for one user turn, ending where the assistant's answer starts."""
    return render(tokenizer, [{"role": "user", "content": user_text}], True)


def vqa_prompt(tokenizer: object, question: str) -> str:
    """Prompt text for a visual question; `<image>` is expanded to the image tokens by the processor."""
    return chat_prompt(tokenizer, f"{IMAGE_TOKEN}\n{question}")


def encode_text(tokenizer: object, text: str, image_tokens: int = 0) -> list[int]:
    """Token ids of `text`, each `<image>` expanded to `image_tokens` copies (as LlavaProcessor does)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if image_tokens <= 0:
        return ids
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    out: list[int] = []
    for i in ids:
        out.extend([i] * image_tokens if i == image_id else [i])
    return out


def encode_chat(
    tokenizer: object, turns: Sequence[tuple[str, str]], image_tokens: int = 0
) -> tuple[list[int], list[int]]:
    """Input ids and labels for a (multi-turn) chat; only answer tokens and their end-of-turn get a loss.

    `turns` are (user text, assistant answer) pairs. The first user text may start with `<image>\\n`.
    """
    if not turns:
        raise SoupError("encode_chat needs at least one (question, answer) turn")
    messages: list[dict] = []
    done = ""
    ids: list[int] = []
    labels: list[int] = []
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        prompt = render(tokenizer, messages, True)
        if not prompt.startswith(done):
            raise SoupError("chat template is not incremental: cannot split prompt and answer tokens")
        part = encode_text(tokenizer, prompt[len(done):], image_tokens)
        ids += part
        labels += [IGNORE] * len(part)
        messages.append({"role": "assistant", "content": answer})
        full = render(tokenizer, messages, False)
        if not full.startswith(prompt):
            raise SoupError("chat template is not incremental: cannot split prompt and answer tokens")
        # "answer<|im_end|>" gets the loss; the newline after it belongs to the next prompt.
        body = full[len(prompt):].rstrip("\n")
        part = encode_text(tokenizer, body)
        ids += part
        labels += part
        done = prompt + body
    return ids, labels
