"""Tiny random-init instances of the six supported architectures, built fully offline.

`tiny_model_dir(arch)` builds a small model from the architecture's *real* transformers config class (shrunk in
width/depth but with the structural fields kept), a matching processor (tokenizer built with the `tokenizers`
library, the real image-processor/processor classes, a chat template mimicking the hub one) and saves both with
`save_pretrained` into a directory, which it returns. Load it back with

    model = <ModelClass>.from_pretrained(path)          # e.g. LlavaForConditionalGeneration
    processor = AutoProcessor.from_pretrained(path)

No hub access is needed at any point. Weights depend only on `(arch, num_layers, hidden_size, image_size, seed)`.

Sizes (defaults): decoder hidden 64, 4 attention heads, 2 KV heads (GQA), intermediate 128, 4 layers;
vision tower hidden 32, 4 heads, intermediate 64, 2 layers (VipLLaVA: 12 layers, so that its real
`vision_feature_layer = [-2, -5, -8, -11, 6]` is kept verbatim and indexes 5 distinct hidden states).
Image resolution (`image_size`, the vision tower's square input): 32 by default with patch 8 (16 image tokens per
image for LLaVA/VipLLaVA); any multiple of 14 uses patch 14 (`image_size=336` -> LLaVA-1.5's 24x24 = 576 tokens).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from .new_archs import DEFAULT_IMAGE_SIZE as NEW_IMAGE_SIZE
from .new_archs import NEW_ARCHS, build as build_new, randomize_zero_init

# every supported architecture, as a tiny random model (the names of `fusion_utils.archs.ARCHS`)
PAPER_ARCHS = ("llava", "llava_next", "vipllava", "instructblip", "qwen2_vl", "qwen2_5_vl")
TINY_ARCHS = PAPER_ARCHS + NEW_ARCHS  # the paper's six, then issue 31's image-text-to-text architectures

BUILD_VERSION = 1  # bump when the construction changes, so persistent `root` caches are not reused

# shrunk sizes
TEXT_HIDDEN = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_LAYERS = 4
VISION_HIDDEN = 32
VISION_HEADS = 4
VISION_LAYERS = 2
VIPLLAVA_VISION_LAYERS = 12
QFORMER_HIDDEN = 32
QFORMER_LAYERS = 2
NUM_QUERY_TOKENS = 32
DEFAULT_IMAGE_SIZE = {"llava": 32, "llava_next": 32, "vipllava": 32, "instructblip": 32, "qwen2_vl": 64,
                      "qwen2_5_vl": 64, **NEW_IMAGE_SIZE}

# ---------------------------------------------------------------------------------------------------------------
# chat templates (mimicking the hub ones)
# ---------------------------------------------------------------------------------------------------------------
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-vicuna-*: same vicuna style as 1.5 (system text rendered verbatim)
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{{ message['content'][0]['text'] + ' ' }}{% endif %}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
VIPLLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{{ message['content'][0]['text'] }}{% endif %}"
    "{% else %}{{ '###' }}{% if message['role'] == 'user' %}{{ 'Human: ' }}{% else %}{{ 'Assistant: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '###Assistant:' }}{% endif %}"
)
# Qwen/Qwen2-VL-7B-Instruct (Qwen2.5-VL ships the same one)
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

from .tokenizers import bert_tokenizer as _bert_tokenizer  # noqa: E402
from .tokenizers import llama_tokenizer as _llama_tokenizer  # noqa: E402
from .tokenizers import qwen_tokenizer as _qwen_tokenizer  # noqa: E402
from .tokenizers import round_vocab as _round_vocab  # noqa: E402
from .new_archs import mrope_section, patch_for, qwen_vision_ids  # noqa: E402  (one definition for every tiny model)


# ---------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------
def _llama_text_config(num_layers, hidden, vocab_size, pad_id):
    return dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=num_layers, num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS,
                head_dim=hidden // TEXT_HEADS, max_position_embeddings=4096, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, pad_token_id=pad_id, tie_word_embeddings=False)


def _clip_vision_config(image_size, layers=VISION_LAYERS):
    return dict(model_type="clip_vision_model", hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                projection_dim=VISION_HIDDEN, num_hidden_layers=layers, num_attention_heads=VISION_HEADS,
                image_size=image_size, patch_size=patch_for(image_size), hidden_act="quick_gelu")


def _qwen_text_config(model_type, num_layers, hidden, vocab_size, tok):
    head_dim = hidden // TEXT_HEADS
    return dict(model_type=model_type, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=num_layers, num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS,
                max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                max_window_layers=num_layers,
                rope_scaling={"type": "mrope", "mrope_section": mrope_section(head_dim), "rope_theta": 1000000.0},
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), tie_word_embeddings=False)


def _build(arch: str, num_layers: int, hidden: int, image_size: int):
    """Returns (config, processor, model_class)."""
    if hidden % (TEXT_HEADS * 4):
        raise ValueError(f"hidden_size must be a multiple of {TEXT_HEADS * 4} (4 heads, even rotary halves)")
    if arch in NEW_ARCHS:
        return build_new(arch, num_layers, hidden, image_size)
    if arch in ("llava", "llava_next", "vipllava"):
        return _build_llava(arch, num_layers, hidden, image_size)
    if arch == "instructblip":
        return _build_instructblip(num_layers, hidden, image_size)
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        return _build_qwen(arch, num_layers, hidden, image_size)
    raise ValueError(f"unknown arch {arch!r}; expected one of {TINY_ARCHS}")


def _build_llava(arch: str, num_layers: int, hidden: int, image_size: int):
    import transformers as tf
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tok = _llama_tokenizer(["<image>", "<pad>"], pad_token="<pad>")
    image_id, pad_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")
    vocab_size = _round_vocab(len(tok))
    text = _llama_text_config(num_layers, hidden, vocab_size, pad_id)
    patch = patch_for(image_size)
    tokens_square = (image_size // patch) ** 2
    clip_kw = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                   do_center_crop=True, do_resize=True, do_normalize=True, image_mean=OPENAI_CLIP_MEAN,
                   image_std=OPENAI_CLIP_STD)
    proc_kw = dict(patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   image_token="<image>")
    if arch == "llava":
        config = tf.LlavaConfig(text_config=text, vision_config=_clip_vision_config(image_size),
                                image_token_index=image_id, image_seq_length=tokens_square,
                                vision_feature_layer=-2, vision_feature_select_strategy="default",
                                projector_hidden_act="gelu", tie_word_embeddings=False, pad_token_id=pad_id)
        processor = tf.LlavaProcessor(image_processor=tf.CLIPImageProcessor(**clip_kw), tokenizer=tok,
                                      chat_template=LLAVA_CHAT_TEMPLATE, **proc_kw)
        return config, processor, tf.LlavaForConditionalGeneration
    if arch == "vipllava":
        # real llava-hf/vip-llava-7b-hf: LlavaProcessor + CLIPImageProcessor, vision_feature_layer
        # [-2, -5, -8, -11, 6] over a 24-layer CLIP; kept verbatim over a 12-layer tiny CLIP.
        config = tf.VipLlavaConfig(text_config=text,
                                   vision_config=_clip_vision_config(image_size, VIPLLAVA_VISION_LAYERS),
                                   image_token_index=image_id, image_seq_length=tokens_square,
                                   vision_feature_layer=[-2, -5, -8, -11, 6], projector_hidden_act="gelu",
                                   tie_word_embeddings=False, pad_token_id=pad_id)
        processor = tf.LlavaProcessor(image_processor=tf.CLIPImageProcessor(**clip_kw), tokenizer=tok,
                                      chat_template=VIPLLAVA_CHAT_TEMPLATE, **proc_kw)
        return config, processor, tf.VipLlavaForConditionalGeneration
    # llava_next: real pinpoints [[336,672],[672,336],[672,672],[1008,336],[336,1008]] scaled to the base size
    pinpoints = [[image_size * a, image_size * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    config = tf.LlavaNextConfig(text_config=text, vision_config=_clip_vision_config(image_size),
                                image_token_index=image_id, image_seq_length=tokens_square,
                                vision_feature_layer=-2, vision_feature_select_strategy="default",
                                image_grid_pinpoints=pinpoints, projector_hidden_act="gelu",
                                tie_word_embeddings=False, pad_token_id=pad_id)
    ip = tf.LlavaNextImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size},
                                    image_grid_pinpoints=pinpoints, do_pad=True, image_mean=OPENAI_CLIP_MEAN,
                                    image_std=OPENAI_CLIP_STD)
    processor = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
                                      **proc_kw)
    return config, processor, tf.LlavaNextForConditionalGeneration


def _build_instructblip(num_layers: int, hidden: int, image_size: int):
    import transformers as tf
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tok = _llama_tokenizer(["<image>", "<pad>"], pad_token="<pad>")
    qtok = _bert_tokenizer()
    image_id, pad_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")
    text = _llama_text_config(num_layers, hidden, _round_vocab(len(tok)), pad_id)
    config = tf.InstructBlipConfig(
        vision_config=dict(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                           num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS,
                           image_size=image_size, patch_size=patch_for(image_size), qkv_bias=True),
        qformer_config=dict(vocab_size=_round_vocab(len(qtok)), hidden_size=QFORMER_HIDDEN,
                            num_hidden_layers=QFORMER_LAYERS, num_attention_heads=4,
                            intermediate_size=2 * QFORMER_HIDDEN, max_position_embeddings=128,
                            cross_attention_frequency=1, encoder_hidden_size=VISION_HIDDEN, pad_token_id=0),
        text_config=text, num_query_tokens=NUM_QUERY_TOKENS, image_token_index=image_id,
    )
    ip = tf.BlipImageProcessor(size={"height": image_size, "width": image_size}, do_resize=True,
                               do_normalize=True, do_convert_rgb=True, image_mean=OPENAI_CLIP_MEAN,
                               image_std=OPENAI_CLIP_STD)
    processor = tf.InstructBlipProcessor(image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok,
                                         num_query_tokens=NUM_QUERY_TOKENS)
    return config, processor, tf.InstructBlipForConditionalGeneration


def _build_qwen(arch: str, num_layers: int, hidden: int, image_size: int):
    import transformers as tf
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tok = _qwen_tokenizer()
    vocab_size = _round_vocab(len(tok))
    patch, merge = patch_for(image_size), 2
    factor = patch * merge
    ids = qwen_vision_ids(tok)
    text = _qwen_text_config(f"{arch}_text", num_layers, hidden, vocab_size, tok)
    if arch == "qwen2_vl":
        vision = dict(depth=VISION_LAYERS, embed_dim=VISION_HIDDEN, hidden_size=hidden, mlp_ratio=2,
                      num_heads=VISION_HEADS, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2,
                      hidden_act="quick_gelu")
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        proc_cls, model_cls = tf.Qwen2VLProcessor, tf.Qwen2VLForConditionalGeneration
    else:
        # real: window 112 = 4 merged units of 2x2 patches of 14 px; fullatt blocks [7,15,23,31] of 32 (every 4th)
        vision = dict(depth=VISION_LAYERS, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                      num_heads=VISION_HEADS, out_hidden_size=hidden, patch_size=patch, spatial_merge_size=merge,
                      temporal_patch_size=2, window_size=4 * factor, tokens_per_second=4,
                      fullatt_block_indexes=[VISION_LAYERS - 1], hidden_act="silu")
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        proc_cls, model_cls = tf.Qwen2_5_VLProcessor, tf.Qwen2_5_VLForConditionalGeneration
    # min: 2x2 merged tokens; max: image_size^2 pixels (64 -> at most 4x4 = 16 merged tokens)
    pix = dict(min_pixels=(2 * factor) ** 2, max_pixels=max(image_size, 2 * factor) ** 2, patch_size=patch,
               merge_size=merge, temporal_patch_size=2, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    ip = tf.Qwen2VLImageProcessor(**pix)
    vp = tf.Qwen2VLVideoProcessor(**pix)
    processor = proc_cls(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_CHAT_TEMPLATE)
    return config, processor, model_cls


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------
_LOCK = threading.Lock()
_CACHE: dict[tuple, Path] = {}
_TMP_ROOT: Path | None = None


def _tmp_root() -> Path:
    global _TMP_ROOT
    if _TMP_ROOT is None:
        _TMP_ROOT = Path(tempfile.mkdtemp(prefix="fusion_utils_tiny_"))
        atexit.register(shutil.rmtree, _TMP_ROOT, ignore_errors=True)
    return _TMP_ROOT


def tiny_model_dir(arch: str, *, num_layers: int | None = None, hidden_size: int | None = None,
                   image_size: int | None = None, root: str | Path | None = None, seed: int = 0) -> Path:
    """Directory holding a tiny random-init `arch` model + processor (`save_pretrained`, safetensors).

    Built once per process per argument set (in a process-lifetime temp dir, or under `root`, where a complete
    directory from an earlier process is reused). `num_layers`: decoder layers (default 4); `hidden_size`: decoder
    width (default 64, multiple of 16); `image_size`: vision tower input side (default 32; Qwen: max image side,
    default 64; a multiple of 14 switches to patch 14). Same arguments and seed => identical weights.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {TINY_ARCHS}")
    num_layers = TEXT_LAYERS if num_layers is None else int(num_layers)
    hidden = TEXT_HIDDEN if hidden_size is None else int(hidden_size)
    image_size = DEFAULT_IMAGE_SIZE[arch] if image_size is None else int(image_size)
    key = (arch, num_layers, hidden, image_size, int(seed), str(root) if root is not None else None)
    with _LOCK:
        if key in _CACHE and (_CACHE[key] / ".complete").exists():
            return _CACHE[key]
        base = Path(root) if root is not None else _tmp_root()
        base.mkdir(parents=True, exist_ok=True)
        out = base / f"{arch}-L{num_layers}-H{hidden}-I{image_size}-s{seed}-v{BUILD_VERSION}"
        if not (out / ".complete").exists():
            _write(out, arch, num_layers, hidden, image_size, int(seed))
        _CACHE[key] = out
        return out


def _write(out: Path, arch, num_layers, hidden, image_size, seed) -> None:
    import torch

    config, processor, model_cls = _build(arch, num_layers, hidden, image_size)
    fork_devices = []  # keep the caller's global RNG state untouched
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        if arch in NEW_ARCHS:
            randomize_zero_init(model)
    gen = model.generation_config
    tok = processor.tokenizer
    gen.pad_token_id = tok.pad_token_id
    gen.eos_token_id = tok.eos_token_id
    if tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    if arch.startswith("qwen"):  # as Qwen/Qwen2-VL-7B-Instruct: stop on <|im_end|> or <|endoftext|>
        gen.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
        gen.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    if arch == "instructblip":
        model.language_model.generation_config.pad_token_id = tok.pad_token_id

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / ".complete").write_text(json.dumps(dict(arch=arch, num_layers=num_layers, hidden_size=hidden,
                                                       image_size=image_size, seed=seed, version=BUILD_VERSION)))
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race (or a stale incomplete dir is in the way)
            if (out / ".complete").exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(out, ignore_errors=True)
                os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_SAMPLE_SIZES = [(40, 32), (32, 48), (64, 64), (48, 24), (24, 56), (56, 40)]  # (width, height)


def sample_images(n: int = 2, seed: int = 0):
    """`n` deterministic RGB PIL images of varied sizes/aspect ratios (40x32, 32x48, 64x64, ...) with random
    blocky content."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        w, h = _SAMPLE_SIZES[i % len(_SAMPLE_SIZES)]
        coarse = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
        arr = np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        arr = np.clip(arr.astype(np.int16) + rng.integers(-20, 21, size=arr.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr))
    return images


DEFAULT_SAVE_DIR = Path(tempfile.gettempdir()) / "fusion-utils-tiny"


def save_tiny_models(dest: str | Path = DEFAULT_SAVE_DIR, archs=TINY_ARCHS, **sizes) -> dict[str, Path]:
    """Save the tiny model of each of ``archs`` as ``dest/<arch>`` (a `save_pretrained` directory, as a user's own
    checkpoint would be), and return ``{arch: path}``. A parameters file can then list ``dest/<arch>`` under
    ``models`` (book/params/tiny-archs.yml does). ``sizes``: `tiny_model_dir`'s num_layers, hidden_size,
    image_size. Existing complete directories are kept, so rerunning is cheap."""
    dest = Path(dest).resolve()
    out = {}
    for arch in archs:
        built = tiny_model_dir(arch, root=dest / ".builds", **sizes)
        link = dest / arch
        if link.is_symlink() and link.resolve() != built.resolve():
            link.unlink()  # built with other sizes before: point at this build
        if not link.exists():
            # a relative link, so the directory can be moved as a whole
            link.symlink_to(os.path.relpath(built, dest), target_is_directory=True)
        out[arch] = link
    return out


def main(argv=None) -> int:
    """``python -m fusion_utils.testing [DEST] [ARCH ...]``: save tiny models for a book build (see `save_tiny_models`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fusion_utils.testing", description=main.__doc__)
    parser.add_argument("dest", nargs="?", default=str(DEFAULT_SAVE_DIR), help=f"default {DEFAULT_SAVE_DIR}")
    parser.add_argument("archs", nargs="*", metavar="ARCH", help=f"architectures (default all: {', '.join(TINY_ARCHS)})")
    args = parser.parse_args(argv)
    bad = [a for a in args.archs if a not in TINY_ARCHS]
    if bad:
        parser.error(f"unknown architecture(s) {', '.join(bad)}; choose from {', '.join(TINY_ARCHS)}.")
    for arch, path in save_tiny_models(args.dest, args.archs or TINY_ARCHS).items():
        print(f"{arch:12s} {path}")
    return 0


__all__ = ["TINY_ARCHS", "tiny_model_dir", "sample_images", "save_tiny_models", "DEFAULT_SAVE_DIR"]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
