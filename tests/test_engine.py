"""The engine's plan protocol and the one-layer probes, on tiny random instances of all six architectures.

- one-layer zero at ℓ changes only layer ℓ: hidden states entering layers ≤ ℓ are the plain ones, and the image
  positions' states leaving every layer ≥ ℓ are the plain ones, while the answer position's are not;
- `ScaleAttention(ℓ, 1)` is the plain model, `ScaleAttention(ℓ, 0)` the knockout of the same keys;
- a plan written outside the package (mean-ablation of the image) installs, acts, and is removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fusion_utils import MaskImage, Plan, ScaleAttention, ScaleImage, intervene, load_model
from fusion_utils.engine import AttentionEdit, HiddenEdit
from fusion_utils.engine.plans import Site, block_edges
from fusion_utils.testing import TINY_ARCHS, sample_images, tiny_model_dir

QUESTIONS = ["what is the color of the object ?", "what shape is it ?"]


@pytest.fixture(scope="module", params=TINY_ARCHS)
def lm(request):
    torch.manual_seed(0)
    return load_model(tiny_model_dir(request.param))


@pytest.fixture(scope="module")
def batch(lm):
    return lm.prepare(list(zip(sample_images(2, seed=0), QUESTIONS)))


def hidden_states(lm, batch, *plans):
    """Per decoder layer, the hidden states entering it, then the final layer's output: [L + 1] of [B, S, D]."""
    states: list = [None] * (lm.num_layers + 1)

    def pre(j):
        def h(module, args, kwargs):
            states[j] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return h

    def post(module, args, output):
        states[-1] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handles = [layer.register_forward_pre_hook(pre(j), with_kwargs=True) for j, layer in enumerate(lm.layers)]
    handles.append(lm.layers[-1].register_forward_hook(post))
    try:
        with torch.no_grad(), intervene(lm, batch, *plans):
            logits = lm.model(**batch.inputs).logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()
    return states, logits


@pytest.mark.parametrize("at", ["first", "middle"])
def test_one_layer_zero_changes_only_its_layer(lm, batch, at):
    L = lm.num_layers
    ell = 0 if at == "first" else L // 2
    plain, plain_logits = hidden_states(lm, batch)
    masked, masked_logits = hidden_states(lm, batch, MaskImage(ell, "zero"))
    img = batch.image_mask
    for j in range(ell + 1):  # entering layers 0..ℓ: hooks see the states before the mask is applied at ℓ
        torch.testing.assert_close(masked[j], plain[j], rtol=0, atol=0)
    for j in range(ell + 1, L + 1):  # leaving layers ℓ..L-1: the image positions carry the unmasked stream
        if lm.spec.bidirectional_prefix and j > ell + 1:  # they read the question, which read the zeroed image
            assert not torch.allclose(masked[j][img], plain[j][img])
            continue
        torch.testing.assert_close(masked[j][img], plain[j][img], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked[ell + 1][:, -1], plain[ell + 1][:, -1])  # the answer position read zeros at ℓ
    assert not torch.allclose(masked_logits, plain_logits)
    # persistent: the image positions never come back
    persistent, _ = hidden_states(lm, batch, MaskImage(ell, "zero", onward=True))
    assert not torch.allclose(persistent[ell + 1][img], plain[ell + 1][img])


def test_one_layer_zero_at_the_last_layer_equals_persistent(lm, batch):
    """At the last layer nothing comes after, so both modes (and ScaleImage(λ=0)) give the same logits."""
    L = lm.num_layers
    _, one = hidden_states(lm, batch, MaskImage(L - 1, "zero"))
    _, persistent = hidden_states(lm, batch, MaskImage(L - 1, "zero", onward=True))
    _, scaled = hidden_states(lm, batch, ScaleImage(L - 1, 0.0))
    torch.testing.assert_close(one, persistent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scaled, persistent, rtol=1e-5, atol=1e-5)


def test_one_layer_zero_acts_during_generate(lm, batch):
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad(), intervene(lm, batch, MaskImage(0, "zero")):
        out = lm.model.generate(**batch.inputs, **gen)
        first = lm.model(**batch.inputs).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, batch.seq_len], first)


def test_scale_attention_one_is_plain_and_zero_is_knockout(lm, batch):
    ell = lm.num_layers // 2
    _, plain = hidden_states(lm, batch)
    _, one = hidden_states(lm, batch, ScaleAttention(ell, 1.0))
    torch.testing.assert_close(one, plain, rtol=0, atol=0)
    _, near = hidden_states(lm, batch, ScaleAttention(ell, 1.0 + 1e-6))
    torch.testing.assert_close(near, plain, rtol=1e-4, atol=1e-4)
    # all image keys: the mask's own knockout
    _, zero = hidden_states(lm, batch, ScaleAttention(ell, 0.0))
    _, knock = hidden_states(lm, batch, MaskImage(ell, "knockout"))
    torch.testing.assert_close(zero, knock, rtol=1e-5, atol=1e-5)
    # some image keys: a knockout of exactly those keys
    tokens = [torch.arange(n) % 3 == 0 for n in batch.n_image_tokens]

    @dataclass(frozen=True)
    class BlockChosen(Plan):
        def compile(self, site):
            return [AttentionEdit(ell, block_edges(site.image_tokens(tokens), site.groups["text"]))]

    _, some = hidden_states(lm, batch, ScaleAttention(ell, 0.0, tokens))
    _, blocked = hidden_states(lm, batch, BlockChosen())
    torch.testing.assert_close(some, blocked, rtol=1e-5, atol=1e-5)
    _, tenth = hidden_states(lm, batch, ScaleAttention(ell, 0.1, tokens))
    assert not torch.allclose(tenth, plain) and not torch.allclose(tenth, some)


@dataclass(frozen=True)
class MeanAblateImage(Plan):
    """The README's user-defined plan: every image position gets the mean image hidden state at one layer."""

    layer: int

    def compile(self, site):
        img = site.groups["image"]

        def edit(hidden, step):
            m = step.queries(img)[..., None]
            if not m.any():
                return hidden
            mean = (hidden * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
            return torch.where(m, mean.to(hidden.dtype), hidden)

        return [HiddenEdit(site.layer(self.layer), edit)]


def test_user_defined_plan(lm, batch):
    plain_states, plain = hidden_states(lm, batch)
    states, ablated = hidden_states(lm, batch, MeanAblateImage(1))
    assert not torch.allclose(ablated, plain)
    torch.testing.assert_close(states[1], plain_states[1], rtol=0, atol=0)  # layers below are untouched
    assert all(not layer._forward_pre_hooks for layer in lm.layers)  # removed after the block
    with pytest.raises(TypeError, match="is not a plan"):
        with intervene(lm, batch, "mask layer 3"):
            pass


def test_exit_at_gives_the_early_exit_logits_and_generates_from_the_layer(lm, batch):
    from fusion_utils import early_exit_logits
    from fusion_utils.engine import ExitAt

    ee = early_exit_logits(lm, batch)
    for j in (0, lm.num_layers // 2):
        _, logits = hidden_states(lm, batch, ExitAt(j))
        torch.testing.assert_close(logits, ee[j], rtol=1e-4, atol=1e-4)
    _, last = hidden_states(lm, batch, ExitAt(-1))
    torch.testing.assert_close(last, ee[-1], rtol=1e-4, atol=1e-4)
    # generated tokens come from the layer too: step 2's token is the argmax of the layer's logits after step 1
    with torch.no_grad(), intervene(lm, batch, ExitAt(0)):
        out = lm.model.generate(**batch.inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    ext = lm.prepare(list(zip(sample_images(2, seed=0), QUESTIONS)))
    ids = torch.cat([ext.inputs["input_ids"], out[:, batch.seq_len:batch.seq_len + 1]], dim=1)
    inputs = dict(ext.inputs, input_ids=ids,
                  attention_mask=torch.cat([ext.inputs["attention_mask"], torch.ones_like(ids[:, :1])], dim=1))
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids[:, :1])], dim=1)
    with torch.no_grad(), intervene(lm, ext, ExitAt(0)):
        step2 = lm.model(**inputs).logits[:, -1].argmax(-1)
    assert torch.equal(step2, out[:, batch.seq_len + 1])


@pytest.mark.parametrize("mode", ["zero", "knockout"])
def test_fast_sweep_equals_naive_for_one_unpadded_sample(lm, mode):
    """Batch of one: no padding mask is recorded (the kernel is causal by itself), so the sweep spells it out."""
    from fusion_utils import masking_sweep

    one = lm.prepare(list(zip(sample_images(1, seed=3), QUESTIONS[:1])))
    fast = masking_sweep(lm, one, mode=mode)
    naive = masking_sweep(lm, one, mode=mode, method="naive")
    torch.testing.assert_close(fast["logits"], naive["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["zero", "knockout"])
@pytest.mark.parametrize("n", [1, 3])
def test_fast_sweep_shares_one_prefix_copy(lm, mode, n, monkeypatch):
    """Unpadded prompts (one sample, or several of equal length): the variants' question rows read one copy of the
    prefix keys and values (the split attention, combined through log-sum-exps), and still equal the naive sweep --
    for single layers, a window, and a subset of layers. A padded batch takes the tiled path (the tests above)."""
    from fusion_utils import masking_sweep
    from fusion_utils.engine import sweeps

    used = []
    real = sweeps.shared_suffix_pass

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        used.append(out is not None)
        return out

    monkeypatch.setattr(sweeps, "shared_suffix_pass", spy)
    images = sample_images(n, seed=3)
    images = [im.resize(images[0].size) for im in images]  # one size: no padding (Qwen's token count follows it)
    b = lm.prepare(list(zip(images, QUESTIONS[:1] * n)))
    mask = b.inputs.get("attention_mask")
    assert mask is None or bool(mask.all())
    L = lm.num_layers
    for kw in (dict(), dict(window=3), dict(layers=[L - 1, 1])):
        used.clear()
        fast = masking_sweep(lm, b, mode=mode, **kw)
        naive = masking_sweep(lm, b, mode=mode, method="naive", **kw)
        # injections between layers (DeepStack) send every sweep down the naive path; layout tokens inside the image
        # (Idefics3's tile tags, Pixtral's row breaks) put text before the image's end, so no prefix is shared
        blocks = Site(lm, b).image_blocks()
        sliding = "sliding_attention" in (getattr(lm.text_config, "layer_types", None) or ())  # a cache it cannot fork
        shared = not (lm.spec.injections or lm.spec.bidirectional_prefix or sliding) and torch.equal(blocks,
                                                                                                     b.image_mask)
        assert used == ([True] if shared else []), kw
        torch.testing.assert_close(fast["logits"], naive["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["zero", "knockout"])
def test_fast_sweep_equals_naive_with_text_between_two_images(lm, mode):
    """[original, second image] prompts (the crop variant, ViCrop) put text between the two images. That text reads
    the first image, so it is not part of the prefix the variants share: the fast sweeps recompute it and still equal
    the naive ones. (They once took the prefix up to the last image token and missed this.) InstructBLIP takes one
    image per prompt and says so."""
    from fusion_utils import masking_sweep

    a, b2 = sample_images(2, seed=3)
    if lm.spec.model_type == "instructblip":
        with pytest.raises(ValueError, match="exactly one image per prompt"):
            lm.prepare([(a, QUESTIONS[0])], images=[[a, b2.resize(a.size)]])
        return
    b = lm.prepare([(a, QUESTIONS[0]), (b2, QUESTIONS[1])], images=[[a, b2.resize(a.size)], [b2, a.resize(b2.size)]])
    img = b.image_mask[0]
    first_text_after = int(((img.cumsum(0) > 0) & ~img).nonzero()[0])
    # PaliGemma's processor puts every image before BOS and the text: nothing between them
    assert img[first_text_after:].any() != (lm.spec.model_type == "paligemma"), "text between the two images?"
    fast = masking_sweep(lm, b, mode=mode)
    naive = masking_sweep(lm, b, mode=mode, method="naive")
    torch.testing.assert_close(fast["logits"], naive["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_split_attention_equals_attention_over_all_keys(fused):
    """A prefix part and a causal suffix part, combined through their log-sum-exps, are one softmax over the union of
    the keys -- with the CPU flash kernel and with materialised scores (other devices)."""
    from fusion_utils.engine.prefix import attend, fold, unfold

    torch.manual_seed(0)
    B, n, kv, g, P, T, D = 2, 3, 2, 2, 7, 5, 8
    q = torch.randn(n * B, kv * g, T, D)
    kp, vp = torch.randn(B, kv, P, D), torch.randn(B, kv, P, D)
    ks, vs = torch.randn(n * B, kv * g, T, D), torch.randn(n * B, kv * g, T, D)
    o_p, lse_p = attend(fold(q, B, kv), kp, vp, 0.3, False, fused)
    o_p, lse_p = unfold(o_p, B, kv * g, T), unfold(lse_p, B, kv * g, T)
    o_s, lse_s = attend(q, ks, vs, 0.3, True, fused)
    total = torch.logaddexp(lse_p, lse_s)
    got = o_p * torch.exp(lse_p - total)[..., None] + o_s * torch.exp(lse_s - total)[..., None]
    rep = lambda x: x.repeat_interleave(g, dim=1).repeat(n, 1, 1, 1)  # noqa: E731 (variant-major rows)
    keys, values = torch.cat([rep(kp), ks], dim=2), torch.cat([rep(vp), vs], dim=2)
    allowed = torch.cat([torch.ones(T, P, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=0.3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("last_only", [False, True])
def test_split_attention_groups_and_last_row_equal_full_attention(last_only):
    """`split_attention` over two prefix groups (the full prefix, a shorter one) equals one masked attention over
    [prefix + own suffix]; a sweep's final layer (``last_only``) calls it twice -- a keys-only call that stores the
    suffix keys and values and stops, then the last position alone, which reads them -- and the last row still
    does."""
    from fusion_utils.engine.override import STATE
    from fusion_utils.engine.prefix import Group, KeysRead, SharedPrefix, split_attention

    torch.manual_seed(0)
    B, n, kv, g, P, T, D = 2, 3, 2, 2, 7, 5, 8
    H = kv * g
    q = torch.randn(n * B, H, T, D)
    ks, vs = torch.randn(n * B, kv, T, D), torch.randn(n * B, kv, T, D)
    kp, vp = torch.randn(B, kv, P, D), torch.randn(B, kv, P, D)
    state = SharedPrefix(B)
    state.groups = [Group(slice(0, 2 * B), kp, vp), Group(slice(2 * B, 3 * B), kp[:, :, :3], vp[:, :, :3])]
    module = torch.nn.Module()
    setattr(module, STATE, state)
    if last_only:
        state.keys_only = True
        with pytest.raises(KeysRead):
            split_attention(module, q, ks, vs, None, scaling=0.3)
        assert state.suffix_kv[0] is ks and state.suffix_kv[1] is vs
        state.keys_only = False
        # the last position's own key and value are ignored: it reads suffix_kv, which holds them
        got, _ = split_attention(module, q[:, :, -1:], torch.zeros_like(ks[:, :, -1:]),
                                 torch.zeros_like(vs[:, :, -1:]), None, scaling=0.3)
    else:
        got, _ = split_attention(module, q, ks, vs, None, scaling=0.3)  # [N, T, H, D]
    refs = []
    for rows, p in ((slice(0, 2 * B), P), (slice(2 * B, 3 * B), 3)):
        m = rows.stop // B - rows.start // B
        rep = lambda x: x.repeat_interleave(g, dim=1)  # noqa: E731
        keys = torch.cat([rep(kp[:, :, :p]).repeat(m, 1, 1, 1), rep(ks[rows])], dim=2)
        values = torch.cat([rep(vp[:, :, :p]).repeat(m, 1, 1, 1), rep(vs[rows])], dim=2)
        allowed = torch.cat([torch.ones(T, p, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
        refs.append(torch.nn.functional.scaled_dot_product_attention(q[rows], keys, values, attn_mask=allowed,
                                                                      scale=0.3))
    ref = torch.cat(refs).transpose(1, 2)
    if last_only:
        ref = ref[:, -1:]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
