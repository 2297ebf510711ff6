"""One declarative entry per supported architecture (cf. pyvene's model cards).

Everything the rest of the package needs to know about an architecture lives in its `ArchSpec`: where the decoder,
its layers, final norm and LM head are; which config field holds the image token id; how the image tokens are laid
out spatially; how a prompt is built. Code elsewhere reads these fields instead of branching on model type.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # transformers `config.model_type`
    label: str  # the paper's name for the family
    model_class: str  # transformers class
    decoder: str  # dotted path from the top model to the decoder (has .layers, .norm, .embed_tokens)
    lm_head: str  # dotted path to the LM head
    image_token_attrs: tuple[str, ...]  # config fields holding the image token id, first found wins
    grid: str  # image-token layout: "square" | "anyres" | "merged_thw" | "none"
    prompt: str  # "chat_template" | "instructblip" ("Question: ... Answer:"; its processor has no template)
    extra_model_inputs: tuple[str, ...] = ()  # processor outputs the model needs besides ids/mask/pixels
    # dotted path to the module whose generate() continues from a language-model cache ("" = the model itself;
    # InstructBLIP's language model is a separate causal LM)
    language_model: str = ""
    hub_examples: tuple[str, ...] = ()
    paper_notes: str = ""
    fields: dict = field(default_factory=dict)

    @property
    def spatial(self) -> bool:
        """Whether the image tokens tile the picture (InstructBLIP's Q-Former queries do not)."""
        return self.grid != "none"


_SPECS = [
    ArchSpec(
        "llava", "LLaVA-1.5", "LlavaForConditionalGeneration", "model.language_model", "lm_head",
        ("image_token_id", "image_token_index"), "square", "chat_template",
        hub_examples=("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf"),
        paper_notes="fusion layers reported as {2, 4, 8, 11, 12, 13}; review dip near layer 29 of 32",
    ),
    ArchSpec(
        "llava_next", "LLaVA-NeXT", "LlavaNextForConditionalGeneration", "model.language_model", "lm_head",
        ("image_token_id", "image_token_index"), "anyres", "chat_template",
        hub_examples=("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-mistral-7b-hf"),
        paper_notes="review dip near layer 29 of 32",
    ),
    ArchSpec(
        "vipllava", "VipLLaVA", "VipLlavaForConditionalGeneration", "model.language_model", "lm_head",
        ("image_token_id", "image_token_index"), "square", "chat_template",
        hub_examples=("llava-hf/vip-llava-7b-hf",),
        paper_notes="review dip near layer 29 of 32",
    ),
    ArchSpec(
        "instructblip", "InstructBLIP", "InstructBlipForConditionalGeneration", "language_model.model",
        "language_model.lm_head", ("image_token_id", "image_token_index"), "none", "instructblip",
        language_model="language_model",
        hub_examples=("Salesforce/instructblip-vicuna-7b",),
        paper_notes="32 Q-Former query tokens stand for the image; review dip near layer 29 of 32",
    ),
    ArchSpec(
        "qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "model.language_model", "lm_head",
        ("image_token_id",), "merged_thw", "chat_template", extra_model_inputs=("image_grid_thw", "mm_token_type_ids"),
        hub_examples=("Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-2B-Instruct"),
        paper_notes="no review layer; Hellinger distance flat after layer ~24",
    ),
    ArchSpec(
        "qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "model.language_model", "lm_head",
        ("image_token_id",), "merged_thw", "chat_template", extra_model_inputs=("image_grid_thw", "mm_token_type_ids"),
        hub_examples=("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"),
        paper_notes="no review layer",
    ),
]

ARCHS: dict[str, ArchSpec] = {s.model_type: s for s in _SPECS}


def supported() -> str:
    return ", ".join(f"{s.model_type} ({s.label})" for s in _SPECS)


def get_spec(model_type: str) -> ArchSpec:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise ValueError(
            f"Architecture {model_type!r} is not supported; supported architectures are: {supported()}."
        ) from None


def resolve(obj, dotted: str):
    """Follow a dotted attribute path (`model.language_model`) from `obj`."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
