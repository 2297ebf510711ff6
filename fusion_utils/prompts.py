"""Prompt construction shared by every architecture (lmms-eval conventions).

The evaluation harness, the organisms' training data and the experiments all build prompts here, so a model is
always asked in the format it was evaluated with.
"""
from __future__ import annotations

POST_PROMPT = "Answer the question using a single word or phrase."
GENERIC_PROMPT = "Write a general description of the image."  # ViCrop's task-agnostic prompt
INSTRUCTBLIP_TEMPLATE = "Question: {text} Answer:"  # InstructBLIP's processor ships no chat template


def user_text(question: str, post_prompt: str | None = POST_PROMPT) -> str:
    """The user turn's text: the question, then the post-prompt on its own line."""
    question = question.strip()
    return f"{question}\n{post_prompt}" if post_prompt else question


def chat_messages(text: str, n_images: int = 1) -> list[dict]:
    """One user turn holding `n_images` images followed by `text`, in the transformers chat format."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def render_prompt(processor, text: str, n_images: int = 1, style: str = "chat_template") -> str:
    """The prompt string for one sample: the model's chat template, or InstructBLIP's own format."""
    if style == "instructblip":
        return INSTRUCTBLIP_TEMPLATE.format(text=text)
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(
            "This processor has no chat template; save one with the processor (processor.chat_template = ...) "
            "or use an architecture whose prompt style is declared in fusion_utils.archs."
        )
    return processor.apply_chat_template(chat_messages(text, n_images), add_generation_prompt=True, tokenize=False)
