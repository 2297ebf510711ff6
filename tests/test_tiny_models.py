"""The tiny random-init models of `fusion_utils.testing` load, run and are shaped like the real architectures."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusion_utils.prompts import render_prompt, user_text  # noqa: E402
from fusion_utils.testing import PAPER_ARCHS, TINY_ARCHS, sample_images, tiny_model_dir  # noqa: E402

from fusion_utils.archs import ARCHS  # noqa: E402

MODEL_CLASSES = {arch: ARCHS[arch].model_class for arch in TINY_ARCHS}
QUESTIONS = ["What is the color of the car?", "How many people are in the picture?"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load(path, arch):
    model = getattr(transformers, MODEL_CLASSES[arch]).from_pretrained(path).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    return model, processor


def _inputs(processor, arch, images):
    style = "instructblip" if arch == "instructblip" else "chat_template"
    prompts = [render_prompt(processor, user_text(q), 1, style) for q in QUESTIONS[: len(images)]]
    nested = ARCHS[arch].nested_images
    return processor(images=[[im] for im in images] if nested else images, text=prompts, padding=True,
                     return_tensors="pt")


def _image_token_id(config):
    return config.image_token_id


def _consumed_per_image(arch, model, inputs):
    """Rows of image features the model scatters into the sequence, per image (computed by the model itself)."""
    with torch.no_grad():
        if arch == "instructblip":
            out = model.get_image_features(inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"],
                                           qformer_attention_mask=inputs["qformer_attention_mask"], return_dict=True)
        else:
            extra = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
            out = model.model.get_image_features(inputs["pixel_values"], return_dict=True, **extra)
    return [int(f.shape[0]) for f in out.pooler_output]


@pytest.mark.parametrize("arch", PAPER_ARCHS)  # the new ones: tests/test_new_archs.py
def test_tiny_model_roundtrip_forward_generate(arch):
    path = tiny_model_dir(arch)
    assert (path / "model.safetensors").exists()
    model, processor = _load(path, arch)
    assert type(model).__name__ == MODEL_CLASSES[arch]
    assert processor.tokenizer.padding_side == "left"
    cfg = model.config
    text_cfg = cfg.text_config
    assert text_cfg.num_hidden_layers == 4 and text_cfg.hidden_size == 64
    assert text_cfg.num_attention_heads == 4 and text_cfg.num_key_value_heads == 2
    assert text_cfg.vocab_size >= len(processor.tokenizer)

    images = sample_images(2, seed=0)
    assert images[0].size != images[1].size
    inputs = _inputs(processor, arch, images)
    ids = inputs["input_ids"]
    image_id = _image_token_id(cfg)
    assert processor.tokenizer.convert_ids_to_tokens(image_id) in ("<image>", "<|image_pad|>")
    per_row = (ids == image_id).sum(1).tolist()
    consumed = _consumed_per_image(arch, model, inputs)
    assert per_row == consumed, (per_row, consumed)

    if arch == "instructblip":
        assert per_row == [32, 32]
        assert getattr(processor, "chat_template", None) is None
        # the processor prepends the 32 query tokens BEFORE the (left-)padded text: [img]*32 + [pad]* + <s> ...
        for row, mask in zip(ids, inputs["attention_mask"]):
            assert (row[:32] == image_id).all() and (mask[:32] == 1).all()
            bos = (row == processor.tokenizer.bos_token_id).nonzero()[0].item()
            assert bos >= 32 and (mask[32:bos] == 0).all()
    elif arch in ("llava", "vipllava"):
        assert per_row == [16, 16]
    elif arch == "llava_next":
        assert per_row[0] != per_row[1]  # anyres: depends on the image size; includes image_newline positions
    else:
        assert "mm_token_type_ids" in inputs and "image_grid_thw" in inputs
        assert per_row[0] != per_row[1]
        assert per_row == (inputs["image_grid_thw"].prod(-1) // 4).tolist()
        assert inputs["mm_token_type_ids"].sum(1).tolist() == per_row
        assert sum(cfg.text_config.rope_parameters["mrope_section"]) * 2 == text_cfg.hidden_size // 4

    with torch.no_grad():
        out = model(**inputs)
        assert out.logits.shape[:2] == ids.shape
        assert torch.isfinite(out.logits).all()
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 2
    # transformers 5: every arch (InstructBLIP included, it passes input_ids on) returns prompt + new tokens
    assert gen.shape[1] == ids.shape[1] + 3
    assert torch.equal(gen[:, : ids.shape[1]], ids)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_same_seed_same_weights(arch, tmp_path):
    from safetensors.torch import load_file

    a = load_file(tiny_model_dir(arch, root=tmp_path / "a", seed=0) / "model.safetensors")
    b = load_file(tiny_model_dir(arch, root=tmp_path / "b", seed=0) / "model.safetensors")
    c = load_file(tiny_model_dir(arch, root=tmp_path / "c", seed=1) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_model_dir_is_cached():
    assert tiny_model_dir("llava") == tiny_model_dir("llava")


def test_llava_336_32_layers_has_576_image_tokens():
    path = tiny_model_dir("llava", num_layers=32, image_size=336)
    model, processor = _load(path, "llava")
    assert model.config.text_config.num_hidden_layers == 32
    assert model.config.vision_config.patch_size == 14
    inputs = _inputs(processor, "llava", sample_images(2, seed=1))
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [576, 576]
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
