"""One declarative entry per supported architecture (cf. pyvene's model cards).

Everything the rest of the package needs to know about an architecture lives in its `ArchSpec`: where the decoder,
its layers, final norm and LM head are; which config field holds the image token id; how the image tokens are laid
out spatially; how a prompt is built. Code elsewhere reads these fields instead of branching on model type.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


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
    # the family the report and plots group by ("llava", "qwen", "gemma", ...): the paper's LLaVA-family and
    # Qwen-family results are read per family
    family: str = ""
    # dotted path, relative to a decoder layer, of the attention module whose kernel the attention plans wrap
    attention: str = "self_attn"
    # image tokens attend to each other both ways (Gemma 3 through token_type_ids, PaliGemma's prefix-LM)
    bidirectional_image: bool = False
    # the image and the prompt's text form one prefix that attends both ways (PaliGemma's prefix-LM): the image
    # tokens read the question, so a one-layer zero reaches them through it, and sweeps cannot share a prefix
    bidirectional_prefix: bool = False
    # what reaches the image positions other than through layer 0's input ("" = nothing); see `probe_note`
    injections: str = ""
    # the processor takes one list of images per prompt (Gemma 3, Idefics3) rather than one flat list
    nested_images: bool = False
    # one sentence the chapters print beside this model's curves, where the paper's probe means something different
    probe_note: str = ""

    @property
    def paper_family(self) -> str:
        """The paper's family ("llava" or "qwen") for the six architectures it studied, "" for the others: a
        verdict against the paper's effect only applies to its own families' architectures."""
        return self.family if self.model_type in PAPER_ARCHS else ""

    @property
    def spatial(self) -> bool:
        """Whether the image tokens tile the picture (InstructBLIP's Q-Former queries do not)."""
        return self.grid != "none"


PAPER_ARCHS = ("llava", "llava_next", "vipllava", "instructblip", "qwen2_vl", "qwen2_5_vl")

LLAVA_LIKE = dict(decoder="model.language_model", lm_head="lm_head",
                  image_token_attrs=("image_token_id", "image_token_index"), prompt="chat_template")

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

NEW_SPECS = [
    ArchSpec(
        "qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", grid="merged_thw",
        extra_model_inputs=("image_grid_thw", "mm_token_type_ids"), family="qwen",
        hub_examples=("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-2B-Instruct"),
        injections="DeepStack: features from three vision layers are added to the outputs of the first text layers "
                   "at the image positions; a zero mask acts on one layer's input and leaves them in place, a "
                   "knockout (image-to-text attention cut) removes them with the rest of the image, and sweeps "
                   "run naive (a replay of single layers would miss them)",
        probe_note="Qwen3-VL adds vision features into the first text layers' outputs at the image positions "
                   "(DeepStack), so masking the image at one layer does not remove what those layers add.",
        **LLAVA_LIKE,
    ),
    ArchSpec(
        "gemma3", "Gemma 3", "Gemma3ForConditionalGeneration", grid="square", extra_model_inputs=("token_type_ids",),
        family="gemma", bidirectional_image=True, nested_images=True, hub_examples=("google/gemma-3-4b-it", "google/gemma-3-12b-it"),
        probe_note="Gemma 3's image tokens attend to each other both ways (token_type_ids), so an image token's "
                   "state already mixes the whole image before any text reads it.",
        **LLAVA_LIKE,
    ),
    ArchSpec(
        "llava_onevision", "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", grid="anyres",
        extra_model_inputs=("image_sizes",), family="llava",
        hub_examples=("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"),
        **LLAVA_LIKE,
    ),
    ArchSpec(
        "idefics3", "Idefics3", "Idefics3ForConditionalGeneration", grid="tiles_global", family="idefics",
        nested_images=True, decoder="model.text_model", lm_head="lm_head", image_token_attrs=("image_token_id",),
        prompt="chat_template", hub_examples=("HuggingFaceM4/Idefics3-8B-Llama3",),
    ),
    ArchSpec(
        "smolvlm", "SmolVLM", "SmolVLMForConditionalGeneration", grid="tiles_global", family="idefics",
        nested_images=True, decoder="model.text_model", lm_head="lm_head", image_token_attrs=("image_token_id",),
        prompt="chat_template", hub_examples=("HuggingFaceTB/SmolVLM-Instruct", "HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
    ),
    ArchSpec(
        "internvl", "InternVL", "InternVLForConditionalGeneration", grid="tiles_thumbnail", family="internvl",
        hub_examples=("OpenGVLab/InternVL3-8B-hf", "OpenGVLab/InternVL3-2B-hf"), **LLAVA_LIKE,
    ),
    ArchSpec(
        "mistral3", "Mistral 3", "Mistral3ForConditionalGeneration", grid="rows_break", family="mistral",
        extra_model_inputs=("image_sizes",),
        hub_examples=("mistralai/Mistral-Small-3.1-24B-Instruct-2503",), **LLAVA_LIKE,
    ),
    ArchSpec(
        "paligemma", "PaliGemma", "PaliGemmaForConditionalGeneration", grid="square", family="gemma",
        bidirectional_image=True, bidirectional_prefix=True, extra_model_inputs=("token_type_ids",),
        hub_examples=("google/paligemma-3b-mix-224", "google/paligemma2-3b-mix-448"),
        probe_note="PaliGemma's image and question form a prefix that attends both ways, so the image tokens also "
                   "read the question and a knockout of image-to-text attention cuts edges in both directions.",
        **LLAVA_LIKE,
    ),
]

_FAMILIES = {"llava": "llava", "llava_next": "llava", "vipllava": "llava", "instructblip": "llava",
             "qwen2_vl": "qwen", "qwen2_5_vl": "qwen"}
_SPECS = [replace(s, family=_FAMILIES[s.model_type]) for s in _SPECS] + NEW_SPECS

ARCHS: dict[str, ArchSpec] = {s.model_type: s for s in _SPECS}

# architectures where the paper's probe (masking the image tokens in the language model's sequence) cannot apply
REFUSED: dict[str, str] = {
    "mllama": "Mllama reads the image through cross-attention layers, so no image tokens sit in the language "
              "model's sequence for the probe to mask.",
    "florence2": "Florence-2 is an encoder-decoder: the image enters the decoder through cross-attention, not as "
                 "tokens of a decoder-only language model's sequence.",
    "idefics": "Idefics (1) reads the image through gated cross-attention layers, not as tokens in the language "
               "model's sequence.",
    "mamba": "A recurrent (state-space) mixer has no attention between positions, so image-to-text edges cannot "
             "be knocked out.",
    "falcon_mamba": "A recurrent (state-space) mixer has no attention between positions, so image-to-text edges "
                    "cannot be knocked out.",
    "rwkv": "A recurrent mixer has no attention between positions, so image-to-text edges cannot be knocked out.",
    "lfm2_vl": "LFM2's convolutional mixers carry the image into the text without attention, so a knockout of "
               "image-to-text attention does not remove the image.",
}


def supported() -> str:
    return ", ".join(f"{s.model_type} ({s.label})" for s in _SPECS)


def get_spec(model_type: str) -> ArchSpec:
    if model_type in REFUSED:
        raise ValueError(f"Architecture {model_type!r} is refused: {REFUSED[model_type]}")
    try:
        return ARCHS[model_type]
    except KeyError:
        raise ValueError(
            f"Architecture {model_type!r} is not supported; supported architectures are: {supported()}."
        ) from None


def family_of(model_type: str, paper: bool = False) -> str:
    """The family (``"llava"``, ``"qwen"``, ``"gemma"``, ...) of a supported architecture, ``""`` if unknown.
    ``paper=True``: the paper's family, only for the six architectures it studied (`ArchSpec.paper_family`)."""
    spec = ARCHS.get(model_type)
    if spec is None:
        return ""
    return spec.paper_family if paper else spec.family


def families() -> dict[str, tuple[str, ...]]:
    """Every family and its architectures, in registry order."""
    out: dict[str, list[str]] = {}
    for s in _SPECS:
        out.setdefault(s.family, []).append(s.model_type)
    return {k: tuple(v) for k, v in out.items()}


def resolve(obj, dotted: str):
    """Follow a dotted attribute path (`model.language_model`) from `obj`."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def discover(model) -> dict:
    """What can be read off a loaded image-text-to-text model without its `ArchSpec`: the dotted path of the
    decoder (the module holding ``layers``, ``norm`` and ``embed_tokens``), of the LM head (the output embeddings),
    of each layer's attention module, and the image token id from the config. `get_spec` entries declare the same
    paths; a test checks the two agree, so a new entry only has to declare what cannot be discovered (layout,
    bidirectional image attention, injections)."""
    import torch

    decoder = next((name for name, m in model.named_modules()
                    if isinstance(getattr(m, "layers", None), torch.nn.ModuleList) and hasattr(m, "norm")
                    and hasattr(m, "embed_tokens")), None)
    head = model.get_output_embeddings()
    lm_head = next((name for name, m in model.named_modules() if m is head), None)
    attention = None
    if decoder is not None:
        layer = resolve(model, decoder).layers[0]
        attention = next((name for name, m in layer.named_modules()
                          if name and hasattr(m, "q_proj") and hasattr(m, "o_proj")), None)
    cfg = model.config
    token = next((getattr(cfg, a) for a in ("image_token_id", "image_token_index") if getattr(cfg, a, None) is not None),
                 None)
    return {"decoder": decoder, "lm_head": lm_head, "attention": attention, "image_token_id": token}
