"""Tiny offline builders of the image-text-to-text architectures added by issue 31 (Gemma 3, PaliGemma,
Idefics3 / SmolVLM, LLaVA-OneVision, Qwen3-VL, InternVL, Mistral 3).

Each returns ``(config, processor, model class)`` built from the architecture's real transformers classes, shrunk
in width and depth, with the structural fields that decide where image tokens go kept (token layout, special tokens,
tiling, DeepStack injection layers). Chat templates mimic the hub ones in how they place the image.
"""
from __future__ import annotations

from .tokenizers import llama_tokenizer, qwen_tokenizer, round_vocab

TEXT_HEADS = 4
TEXT_KV_HEADS = 2
VISION_HIDDEN = 32
VISION_HEADS = 4
VISION_LAYERS = 2

ALL_NEW = ("qwen3_vl", "gemma3", "llava_onevision", "idefics3", "smolvlm", "internvl", "mistral3", "paligemma")
DEFAULT_IMAGE_SIZE = {"qwen3_vl": 64, "gemma3": 32, "llava_onevision": 32, "idefics3": 32, "smolvlm": 32,
                      "internvl": 32, "mistral3": 32, "paligemma": 32}

# Qwen/Qwen3-VL-8B-Instruct places the image as Qwen2-VL does (no default system turn)
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# (the tokenizers here prepend BOS themselves, so the templates below leave out the hub ones' leading bos_token)
# google/gemma-3-4b-it: <start_of_image> where the image goes, turns as <start_of_turn>user ... <end_of_turn>
GEMMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# llava-hf/llava-onevision-qwen2-0.5b-ov-hf
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# HuggingFaceTB/SmolVLM-256M-Instruct and HuggingFaceM4/Idefics3-8B-Llama3: "User:<image>text<end_of_utterance>"
IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# OpenGVLab/InternVL3-1B-hf (Qwen2 turns; <IMG_CONTEXT> is expanded by the processor inside <img> ... </img>)
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# mistralai/Mistral-Small-3.1-24B-Instruct-2503: [INST] ... [IMG] ... [/INST]
MISTRAL3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for block in message['content'] %}{% if block['type'] == 'text' %}{{ block['text'] }}"
    "{% elif block['type'] == 'image' %}{{ '[IMG]' }}{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'][0]['text'] if message['content'] is not string "
    "else message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
# google/paligemma-3b-mix-224 has no chat template: the processor puts BOS after the last <image> and a newline last,
# so the template only puts the image placeholders before the text
PALIGEMMA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] }}{% endfor %}"
    "{% endif %}{% endif %}{% endfor %}"
)


def patch_for(image_size: int) -> int:
    return 14 if image_size % 14 == 0 else 8


def mrope_section(head_dim: int) -> list[int]:
    """Shrink Qwen's [16, 24, 24] (of head_dim/2 = 64) to sum to head_dim / 2, same 1/4 : 3/8 : 3/8 ratio."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def text_dims(num_layers, hidden):
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS, head_dim=hidden // TEXT_HEADS)


def randomize_zero_init(model) -> None:
    """Give random values to the parameters a checkpoint's init leaves at zero where that would blank the image
    (Gemma 3's projector weight: every image feature would be exactly 0, and masking the image a no-op)."""
    import torch

    proj = getattr(getattr(getattr(model, "model", None), "multi_modal_projector", None),
                   "mm_input_projection_weight", None)
    if proj is not None:
        with torch.no_grad():
            proj.normal_(0.0, 0.05)


def build(arch: str, num_layers: int, hidden: int, image_size: int):
    """``(config, processor, model class)`` of the tiny ``arch``."""
    return BUILDERS[arch](num_layers, hidden, image_size)


def qwen_vision_ids(tok) -> dict:
    """The Qwen-VL config's image, video and vision-boundary token ids, read off the tokenizer."""
    return dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))


def qwen3_vl(num_layers, hidden, image_size):
    import transformers as tf
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tok = qwen_tokenizer()
    patch, merge = patch_for(image_size), 2
    factor = patch * merge
    ids = qwen_vision_ids(tok)
    head_dim = hidden // TEXT_HEADS
    text = dict(model_type="qwen3_vl_text", vocab_size=round_vocab(len(tok)), **text_dims(num_layers, hidden),
                max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                 "mrope_section": mrope_section(head_dim), "mrope_interleaved": True},
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    # real: 27 vision blocks, DeepStack taps [8, 16, 24] feeding text layers 0, 1, 2; here taps 0 and 1 of 2 blocks
    vision = dict(depth=VISION_LAYERS, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                  num_heads=VISION_HEADS, out_hidden_size=hidden, patch_size=patch, spatial_merge_size=merge,
                  temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    pix = dict(size={"shortest_edge": (2 * factor) ** 2, "longest_edge": max(image_size, 2 * factor) ** 2},
               patch_size=patch, merge_size=merge, temporal_patch_size=2, image_mean=OPENAI_CLIP_MEAN,
               image_std=OPENAI_CLIP_STD)
    ip = tf.Qwen2VLImageProcessor(**pix)
    vp = tf.Qwen3VLVideoProcessor(**pix)
    processor = tf.Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                    chat_template=QWEN3_CHAT_TEMPLATE)
    return config, processor, tf.Qwen3VLForConditionalGeneration


def siglip_vision(image_size, **extra):
    return dict(model_type="siglip_vision_model", hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS, image_size=image_size,
                patch_size=patch_for(image_size), **extra)


def gemma3(num_layers, hidden, image_size):
    import transformers as tf

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = llama_tokenizer(list(named.values()) + ["<start_of_turn>", "<end_of_turn>", "<pad>"], pad_token="<pad>",
                          named=named)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in named.items()}
    head_dim = hidden // TEXT_HEADS
    # real gemma-3-4b: 256 soft tokens from a 4x4 average pool over 64x64 patches; here 4x4 patches, kernel 1
    side = image_size // patch_for(image_size)
    text = dict(model_type="gemma3_text", vocab_size=round_vocab(len(tok)), **text_dims(num_layers, hidden),
                query_pre_attn_scalar=head_dim, sliding_window=512, max_position_embeddings=4096,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<end_of_turn>"),
                pad_token_id=tok.pad_token_id)
    config = tf.Gemma3Config(text_config=text, vision_config=siglip_vision(image_size), mm_tokens_per_image=side * side,
                             boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                             image_token_index=ids["image_token"], tie_word_embeddings=True)
    ip = tf.Gemma3ImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3)
    processor = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA3_CHAT_TEMPLATE,
                                   image_seq_length=side * side)
    return config, processor, tf.Gemma3ForConditionalGeneration


def qwen2_text(num_layers, hidden, tok, model_type="qwen2"):
    return dict(model_type=model_type, vocab_size=round_vocab(len(tok)), **text_dims(num_layers, hidden),
                max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), tie_word_embeddings=False)


def llava_onevision(num_layers, hidden, image_size):
    import transformers as tf

    tok = qwen_tokenizer(("<image>", "<video>"), named={"image_token": "<image>", "video_token": "<video>"})
    patch = patch_for(image_size)
    # real: anyres_max_9 over 384-px SigLIP tiles, pinpoints from 384x384 up to 2304x2304; scaled to the base size
    pinpoints = [[image_size * a, image_size * b] for a in range(1, 4) for b in range(1, 4)]
    config = tf.LlavaOnevisionConfig(
        text_config=qwen2_text(num_layers, hidden, tok), vision_config=siglip_vision(image_size),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)
    ip = tf.LlavaOnevisionImageProcessor(size={"height": image_size, "width": image_size},
                                         image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    vp = tf.LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size})
    processor = tf.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                           num_image_tokens=(image_size // patch) ** 2,
                                           vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                           chat_template=ONEVISION_CHAT_TEMPLATE)
    return config, processor, tf.LlavaOnevisionForConditionalGeneration


def llama_text(num_layers, hidden, tok, model_type="llama"):
    return dict(model_type=model_type, vocab_size=round_vocab(len(tok)), **text_dims(num_layers, hidden),
                max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)


def idefics3(num_layers, hidden, image_size, smol=False):
    import transformers as tf

    tiles = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    tiles += [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = llama_tokenizer(tiles + ["<pad>"], pad_token="<pad>")
    patch, scale = patch_for(image_size), 2
    seq = (image_size // patch) ** 2 // scale ** 2  # real: 512-px tiles of 16-px patches, pixel shuffle 4 -> 64
    vision = dict(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=VISION_LAYERS,
                  num_attention_heads=VISION_HEADS, image_size=image_size, patch_size=patch)
    cls = (tf.SmolVLMConfig, tf.SmolVLMImageProcessor, tf.SmolVLMProcessor, tf.SmolVLMForConditionalGeneration) \
        if smol else (tf.Idefics3Config, tf.Idefics3ImageProcessor, tf.Idefics3Processor,
                      tf.Idefics3ForConditionalGeneration)
    config = cls[0](text_config=llama_text(num_layers, hidden, tok), vision_config=vision, scale_factor=scale,
                    image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
                    pad_token_id=tok.pad_token_id)
    # real: longest edge 4 x 364 (Idefics3) / 2 x 512 (SmolVLM), tiles of the vision tower's size
    ip = cls[1](size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size},
                do_image_splitting=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    extra = dict(video_processor=tf.SmolVLMVideoProcessor(size={"longest_edge": image_size},
                                                          max_image_size={"longest_edge": image_size})) if smol else {}
    processor = cls[2](image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=IDEFICS3_CHAT_TEMPLATE,
                       **extra)
    return config, processor, cls[3]


def internvl(num_layers, hidden, image_size):
    import transformers as tf

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = qwen_tokenizer(tuple(named.values()), named=named)
    patch = patch_for(image_size)
    seq = (image_size // patch) ** 2 // 4  # pixel shuffle 0.5 (real: 448-px tiles, 14-px patches -> 256)
    vision = dict(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=VISION_LAYERS,
                  num_attention_heads=VISION_HEADS, image_size=[image_size] * 2, patch_size=[patch] * 2)
    config = tf.InternVLConfig(vision_config=vision, text_config=qwen2_text(num_layers, hidden, tok),
                               image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=seq,
                               downsample_ratio=0.5, tie_word_embeddings=False)
    # real: up to 12 tiles of 448 px plus a thumbnail; here up to 6 tiles of the tower's size
    ip = tf.GotOcr2ImageProcessor(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                  min_patches=1, max_patches=6, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225])
    vp = tf.InternVLVideoProcessor(size={"height": image_size, "width": image_size})
    processor = tf.InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=seq,
                                     chat_template=INTERNVL_CHAT_TEMPLATE)
    return config, processor, tf.InternVLForConditionalGeneration


def mistral3(num_layers, hidden, image_size):
    import transformers as tf

    tok = llama_tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "<pad>"], pad_token="<pad>")
    patch, merge = patch_for(image_size), 2
    vision = dict(model_type="pixtral", hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                  num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS, head_dim=VISION_HIDDEN // 4,
                  image_size=2 * image_size, patch_size=patch)
    # Mistral-Small-3.1's text model has no sliding window (its config says null)
    text = dict(llama_text(num_layers, hidden, tok, "mistral"), sliding_window=None)
    config = tf.Mistral3Config(vision_config=vision, text_config=text,
                               image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=merge,
                               vision_feature_layer=-1, tie_word_embeddings=False)
    # real: longest edge 1540, 14-px patches merged 2 x 2; here longest edge twice the base size
    ip = tf.PixtralImageProcessor(size={"longest_edge": 2 * image_size}, patch_size={"height": patch, "width": patch})
    processor = tf.PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, spatial_merge_size=merge,
                                    chat_template=MISTRAL3_CHAT_TEMPLATE)
    return config, processor, tf.Mistral3ForConditionalGeneration


def paligemma(num_layers, hidden, image_size):
    import transformers as tf

    tok = llama_tokenizer(["<image>", "<pad>"], pad_token="<pad>", named={"image_token": "<image>"})
    side = image_size // patch_for(image_size)
    text = dict(llama_text(num_layers, hidden, tok, "gemma"), hidden_activation="gelu_pytorch_tanh")
    config = tf.PaliGemmaConfig(vision_config=siglip_vision(image_size, projection_dim=hidden), text_config=text,
                                image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=hidden,
                                hidden_size=hidden, tie_word_embeddings=False)
    ip = tf.SiglipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3)
    ip.image_seq_length = side * side
    processor = tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=PALIGEMMA_CHAT_TEMPLATE)
    return config, processor, tf.PaliGemmaForConditionalGeneration


BUILDERS = {"qwen3_vl": qwen3_vl, "gemma3": gemma3, "llava_onevision": llava_onevision, "idefics3": idefics3,
            "smolvlm": lambda *a: idefics3(*a, smol=True), "internvl": internvl, "mistral3": mistral3,
            "paligemma": paligemma}

# the ones built so far, in the order of ALL_NEW
NEW_ARCHS = tuple(a for a in ALL_NEW if a in BUILDERS)
