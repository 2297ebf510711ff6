"""Configs, word-level tokenizers and real processors for the two model organisms (built offline).

Both organisms see the 96 x 96 world image as a 6 x 6 grid of image tokens, ONE token per world cell:

* ``llava``: CLIP vision tower, patch 16 on a 96 px image -> 36 patches + CLS; ``vision_feature_select_strategy
  ="default"`` drops CLS, ``vision_feature_layer=-1`` (the last encoder layer) -> 36 image tokens, row-major.
* ``qwen2_vl``: Qwen2-VL vision tower, patch 8 (12 x 12 patches, temporal patch 2 on the duplicated frame), patch
  merger with ``spatial_merge_size=2`` -> 6 x 6 = 36 merged tokens, row-major; M-RoPE over (t, h, w).
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..data import world
from ..prompts import GENERIC_PROMPT, POST_PROMPT
from ..organism_registry import arch_of, model_class, resolve_name

ARCHITECTURES = ("llava", "qwen2_vl")  # the architectures an organism can have (names: organisms.VARIANTS)
IMAGE_SIZE = world.IMAGE_SIZE
N_IMAGE_TOKENS = world.GRID * world.GRID

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEMPLATE_WORDS = ("user", "assistant", "system", "you", "are", "a", "helpful", "picture", "video", ":", ".", "?", ",",
                  "!", "'", "-")

SPECIALS = {
    "llava": {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "extra": ["<image>"]},
    "qwen2_vl": {"pad": "<|endoftext|>", "bos": None, "eos": "<|im_end|>", "unk": "<unk>",
                 "extra": ["<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]},
}


def words() -> list[str]:
    """Every plain word the tokenizers know: the world, the prompts, the chat templates."""
    text = " ".join([POST_PROMPT, GENERIC_PROMPT, "picture video"]).lower()
    for p in ".,:?!'-":
        text = text.replace(p, f" {p} ")
    vocab = list(world.VOCABULARY) + list(TEMPLATE_WORDS) + text.split()
    return list(dict.fromkeys(vocab))


# Variants whose tokenizer keeps the chat template's newline as a token (appended, so every other id is unchanged).
# Hub LLaVA-1.5's Llama tokenizer does: "USER: <image>\n<image>\nWhat ..." puts a newline between two images' tokens,
# and it is the only thing in a LLaVA prompt that says where the first image ends (Qwen2-VL has
# <|vision_start|> / <|vision_end|> around each image). The 8-layer LLaVA organism shipped with the newline dropped,
# its 72 tokens of [original, crop] one run, and a decoder that counts the crop's objects too (train.ORGANISM_RECIPE).
# llava-16l joins once weights trained with it ship (tests/test_organisms.py checks that shipped weights are what
# this module builds).
NEWLINE_TOKEN = {"llava-32l"}


def build_tokenizer(name: str):
    """A word-level PreTrainedTokenizerFast (lowercasing, whitespace + punctuation split), left padding; `name` is an
    architecture or a variant (``NEWLINE_TOKEN``)."""
    from transformers import PreTrainedTokenizerFast

    sp = SPECIALS[arch_of(name)]
    specials = [t for t in (sp["pad"], sp["bos"], sp["eos"], sp["unk"]) if t] + sp["extra"]
    scene = list(world.SCENE_TOKENS)
    vocab = {t: i for i, t in enumerate(specials + scene + words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=sp["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if sp["bos"]:
        bos_id = vocab[sp["bos"]]
        tok.post_processor = processors.TemplateProcessing(single=f"{sp['bos']} $A", pair=f"{sp['bos']} $A $B",
                                                           special_tokens=[(sp["bos"], bos_id)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    # scene tokens are ordinary (non-special) added tokens so that text scenes can be typed
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in scene])
    if name in NEWLINE_TOKEN:
        tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    kw = dict(tokenizer_object=tok, pad_token=sp["pad"], eos_token=sp["eos"], unk_token=sp["unk"],
              padding_side="left", model_max_length=512, clean_up_tokenization_spaces=True)
    if sp["bos"]:
        kw["bos_token"] = sp["bos"]
    if arch_of(name) == "llava":
        kw["extra_special_tokens"] = {"image_token": "<image>"}
    else:
        kw["extra_special_tokens"] = {"image_token": "<|image_pad|>", "vision_start_token": "<|vision_start|>",
                                      "vision_end_token": "<|vision_end|>", "video_token": "<|video_pad|>"}
    return PreTrainedTokenizerFast(**kw)


def build_processor(name: str):
    variant, name = name, arch_of(name)
    tokenizer = build_tokenizer(resolve_name(variant))
    if name == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        ip = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                do_resize=True, do_center_crop=True, do_convert_rgb=True)
        return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=16,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>")
    if name == "qwen2_vl":
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

        px, low = IMAGE_SIZE * IMAGE_SIZE, MIN_PIXELS.get(resolve_name(variant), IMAGE_SIZE * IMAGE_SIZE)
        ip = Qwen2VLImageProcessor(min_pixels=low, max_pixels=px, size={"shortest_edge": low, "longest_edge": px},
                                   patch_size=8, temporal_patch_size=2, merge_size=2)
        try:
            from transformers import Qwen2VLVideoProcessor

            vp = Qwen2VLVideoProcessor(min_pixels=low, max_pixels=px, size={"shortest_edge": low, "longest_edge": px},
                                       patch_size=8, temporal_patch_size=2, merge_size=2)
        except Exception:  # pragma: no cover - torchvision missing
            vp = None
        return Qwen2VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp,
                                chat_template=QWEN2_VL_CHAT_TEMPLATE)
    raise ValueError(f"Unknown organism {name!r}; use one of {', '.join(ARCHITECTURES)}.")


# default sizes (see README / model cards). rope_theta is scaled to the organisms' short contexts and 16-dim heads:
# with the usual 10000, only ~3 of the 8 rotary frequencies resolve offsets of 1 and 6 tokens (left/right, above/
# below in LLaVA's row-major image tokens), and M-RoPE's width section (the 3 lowest frequencies) turns by 0.003 rad
# per column, so a Qwen2-VL organism could not tell left from right. theta 1 turns every M-RoPE section by 1 rad per
# unit of its own axis (t, h, w): the 6 columns and 6 rows get 6 distinct phases each. With one frequency, one rotary
# pair per spatial axis already resolves it, so the Qwen2-VL organism's sections are (t, h, w) = (6, 1, 1) pairs
# instead of (2, 3, 3): t is the same for every image token, so 12 of a head's 16 dims compare a question with the
# cells' content unmodulated by the cell's place. Measured (text-scene stage, seed 0, step 2000): 0.79 overall on 500
# val questions against 0.77 on 200 with (2, 3, 3) -- no clear gain; spatial questions stay near 0.4 either way.
DEFAULTS = {
    "llava": dict(text_layers=8, width=64, heads=4, ffn=192, vision_layers=4, vision_width=96, vision_ffn=192,
                  tie=False, rope_theta=100.0),
    "qwen2_vl": dict(text_layers=8, width=64, heads=4, ffn=192, vision_layers=4, vision_width=96, vision_ffn=192,
                     tie=False, rope_theta=1.0, mrope_section=[6, 1, 1]),
}


# per-variant departures from DEFAULTS (issue 16: the deep organisms, at the decoder depths of LLaVA-1.5-7B and
# Qwen2.5-VL-7B). Depth costs compute, so the width is halved (head size kept at 16, so rope_theta and M-RoPE's
# sections still resolve the grid, see above). Stage (a) seconds/step, one torch thread, batch 64, the other core busy
# (`python scripts/organism_timing.py`, 2026-11-30):
#   llava  8 layers x 64 (shipped 8l)        0.29 s/step   829k params
#   llava 32 layers x 32, FFN 96             0.47 s/step   816k params   <- llava-32l
#   llava 32 layers x 32, FFN 64             0.43 s/step   718k params
#   llava 32 layers x 48, 3 heads, FFN 144   0.76 s/step   1.36M params
#   llava 32 layers x 64, 4 heads, FFN 192   1.09 s/step   2.11M params
# 3600 steps of stage (a) at 0.47 s/step are 28 min, at 0.76 s/step 46 min: with the vision, joint and two-image
# stages after it, only width 32 leaves room in issue 16's 60 min per organism when the machine is shared (the
# 8-layer llava ran at 0.47 s/step in `make -j2 organisms`, 1.6x its unloaded 0.29).
SIZES = {
    "llava-8l": {},
    "qwen2_vl-8l": {},
    "llava-32l": dict(text_layers=32, width=32, heads=2, ffn=96),
    "qwen2_vl-28l": dict(text_layers=28, width=32, heads=2, ffn=96),
    # the fallback depth at the 8-layer width (the 48-wide llava-16l stalled with the 32-wide llava-32l, see
    # train.ORGANISM_RECIPE): depth is the only change from the 8-layer organisms
    "llava-16l": dict(text_layers=16),
    "qwen2_vl-16l": dict(text_layers=16),
}


# The smallest image a Qwen2-VL organism's processor keeps at its own size (larger ones up to 96 x 96 px too; beyond,
# scaled down to that area). Hub Qwen2-VL reads an image at its own resolution (min_pixels 56 x 56 px), so a crop of
# 3 x 3 cells is 3 x 3 tokens there, one per cell as in the whole image, and the deep Qwen organisms do the same
# (two cells a side, the smallest crop the crop methods make). The 8-layer ones shipped with every image resized to
# 96 x 96 px of area, which magnifies a crop into tokens its tower never learned to read (train.ORGANISM_RECIPE).
MIN_PIXELS = {"qwen2_vl-16l": (2 * world.CELL) ** 2, "qwen2_vl-28l": (2 * world.CELL) ** 2}


def build_config(name: str, tokenizer, **overrides):
    """The model config of organism `name` (an architecture or a variant: `llava`, `llava-32l`, ...)."""
    d = {**DEFAULTS[arch_of(name)], **SIZES[resolve_name(name)], **overrides}
    name = arch_of(name)
    vocab = len(tokenizer)
    if name == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vc = CLIPVisionConfig(hidden_size=d["vision_width"], intermediate_size=d["vision_ffn"],
                              num_hidden_layers=d["vision_layers"], num_attention_heads=4, image_size=IMAGE_SIZE,
                              patch_size=16, projection_dim=d["vision_width"], hidden_act="quick_gelu")
        tc = LlamaConfig(vocab_size=vocab, hidden_size=d["width"], intermediate_size=d["ffn"],
                         num_hidden_layers=d["text_layers"], num_attention_heads=d["heads"],
                         head_dim=d.get("head_dim") or d["width"] // d["heads"],
                         num_key_value_heads=d["heads"], max_position_embeddings=512, rms_norm_eps=1e-5,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=d["tie"],
                         rope_parameters={"rope_type": "default", "rope_theta": float(d["rope_theta"])})
        cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                          image_seq_length=N_IMAGE_TOKENS, vision_feature_select_strategy="default",
                          vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=d["tie"])
        cfg.pad_token_id = tokenizer.pad_token_id
        return cfg
    if name == "qwen2_vl":
        from transformers import Qwen2VLConfig

        head_dim = d.get("head_dim") or d["width"] // d["heads"]
        q = head_dim // 2  # mrope sections (t, h, w) must sum to head_dim / 2
        section = list(d.get("mrope_section") or [q - 2 * (3 * q // 8), 3 * q // 8, 3 * q // 8])
        if sum(section) != q or len(section) != 3:
            raise ValueError(f"mrope_section {section} must be three numbers summing to head_dim / 2 = {q}.")
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
        text = dict(vocab_size=vocab, hidden_size=d["width"], intermediate_size=d["ffn"],
                    num_hidden_layers=d["text_layers"], num_attention_heads=d["heads"], num_key_value_heads=d["heads"],
                    head_dim=head_dim, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=d["tie"],
                    rope_parameters={"rope_type": "default", "rope_theta": float(d["rope_theta"]),
                                     "mrope_section": section},
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        vision = dict(depth=d["vision_layers"], embed_dim=d["vision_width"], hidden_size=d["width"],
                      mlp_ratio=d["vision_ffn"] // d["vision_width"], num_heads=4, in_channels=3, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=d["tie"])
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        return cfg
    raise ValueError(name)


def build(name: str, seed: int = 0, **overrides):
    """(model, processor) freshly initialised (deterministic in `seed`)."""
    import torch

    processor = build_processor(name)
    cfg = build_config(name, processor.tokenizer, **overrides)
    torch.manual_seed(seed)
    model = model_class(name)(cfg)
    gc = model.generation_config
    gc.eos_token_id = processor.tokenizer.eos_token_id
    gc.pad_token_id = processor.tokenizer.pad_token_id
    if processor.tokenizer.bos_token_id is not None:
        gc.bos_token_id = processor.tokenizer.bos_token_id
    gc.do_sample = False
    return model, processor
