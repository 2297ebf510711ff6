"""`intervene`: install plans on a model for one batch, and always remove them (cf. baukit's nethook).

Hidden-state edits are forward (pre-)hooks on decoder layers. Attention edits and reads go through one attention
function registered with transformers' ``AttentionInterface`` (its mask function registered alongside, so causality
is kept); it wraps the model's own kernel (sdpa or eager) and calls it unchanged for every other layer. Edits act in
prefill and in every generation step.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from .capture import AttentionMaps
from .override import attention_modules, attention_override, base_implementation, override_of, \
    register_attention
from .plans import AttentionCall, AttentionEdit, AttentionRead, HiddenEdit, Site, Step



class Installed:
    """The edits of one `intervene` call, grouped by layer, and the hooks that apply them."""

    def __init__(self, lm, batch, plans):
        self.site = Site(lm, batch)
        self.inputs: dict[int, list[HiddenEdit]] = {}
        self.outputs: dict[int, list[HiddenEdit]] = {}
        self.attention: dict[int, list[AttentionEdit]] = {}
        self.reads: dict[int, list[AttentionRead]] = {}
        self.replaying = False  # True while a layer reruns unedited (HiddenEdit.restore): nothing applies then
        self.saved: dict[int, torch.Tensor] = {}
        for plan in plans:
            compile_ = getattr(plan, "compile", None)
            if compile_ is None:
                raise TypeError(f"{plan!r} is not a plan: a plan has compile(site) -> edits (see "
                                "fusion_utils.engine.plans).")
            for e in compile_(self.site):
                self.add(e)

    def add(self, e) -> None:
        if isinstance(e, HiddenEdit):
            (self.inputs if e.at == "input" else self.outputs).setdefault(e.layer, []).append(e)
        elif isinstance(e, AttentionEdit):
            self.attention.setdefault(e.layer, []).append(e)
        elif isinstance(e, AttentionRead):
            self.reads.setdefault(e.layer, []).append(e)
        else:
            raise TypeError(f"Unknown edit {e!r}; a plan compiles into HiddenEdit, AttentionEdit or AttentionRead.")

    @property
    def needs_attention(self) -> bool:
        return bool(self.attention) or bool(self.reads)

    def step(self, j: int, offset: int, q_len: int, k_len: int | None = None, device=None) -> Step:
        return Step(j, offset, q_len, offset + q_len if k_len is None else k_len, self.site.seq_len, device)

    # hidden states
    def pre_hook(self, j: int):
        def hook(module, args, kwargs):
            if self.replaying:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            step = self.step(j, cache_offset(kwargs, j), hidden.shape[1], device=hidden.device)
            restore = [e.restore for e in self.inputs[j] if e.restore is not None]
            if restore:
                self.save_unedited(module, j, args, kwargs, step, restore)
            for e in self.inputs[j]:
                hidden = e.fn(hidden, step)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs
        return hook

    def save_unedited(self, module, j, args, kwargs, step, restore) -> None:
        keep = torch.stack([step.queries(r) for r in restore]).any(0)
        if not keep.any():
            return
        if step.offset != 0:
            raise RuntimeError("A one-layer edit (HiddenEdit.restore) needs its restored positions in a pass that "
                               "starts at position 0; run the prompt as one prefill.")
        kw = dict(kwargs)
        kw["past_key_values"] = None  # the unedited rerun must not write this layer's cache
        kw["use_cache"] = False
        self.replaying = True
        try:
            out = module(*args, **kw)
        finally:
            self.replaying = False
        self.saved[j] = (out[0] if isinstance(out, tuple) else out, keep)

    def post_hook(self, j: int):
        def hook(module, args, kwargs, output):
            if self.replaying:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            saved = self.saved.pop(j, None)
            if saved is not None:
                plain, keep = saved
                hidden = torch.where(keep[..., None].to(hidden.device), plain.to(hidden.device), hidden)
            if j in self.outputs:
                step = self.step(j, cache_offset(kwargs, j, after=hidden.shape[1]), hidden.shape[1],
                                 device=hidden.device)
                for e in self.outputs[j]:
                    hidden = e.fn(hidden, step)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    # attention
    def edit_attention(self, j, query, key, mask, scaling, boolean):
        """The layer's mask with its edits applied (None: unchanged), and the reads run on the final mask.

        Edits that only block edges stay boolean (cheap, and sdpa keeps its boolean-mask path); additive biases
        (``log λ``) turn the mask into floats."""
        q_len, k_len = query.shape[2], key.shape[2]
        step = self.step(j, k_len - q_len, q_len, k_len, device=query.device)
        B = self.site.batch_size
        blocked = bias = None
        for e in self.attention.get(j, ()):
            b = e.fn(step)
            if b is None:
                continue
            if b.dtype == torch.bool:
                blocked = b if blocked is None else blocked | b
            else:
                bias = b if bias is None else bias + b
        new = None
        if blocked is not None or bias is not None:
            allowed = allowed_bool(mask, B, q_len, k_len, step.offset, query.device)
            if blocked is not None:
                cut = allowed & ~blocked.to(allowed.device)
                # never leave a row with nothing to attend (padding rows): such rows keep their mask
                allowed = torch.where(cut.any(dim=-1, keepdim=True), cut, allowed)
            dtype = query.dtype if boolean or mask is None else mask.dtype
            if bias is None:
                new = allowed if boolean else torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                    ~allowed, torch.finfo(dtype).min)
            else:
                base = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(
                    ~allowed, float("-inf"))
                total = base + bias.to(base.device)
                total = torch.where(torch.isneginf(total).all(dim=-1, keepdim=True), base, total)
                new = total.clamp_min(torch.finfo(dtype).min).to(dtype)
        reads = self.reads.get(j, ())
        if reads:
            final = new if new is not None else mask

            def rows_of(rows):
                return additive(final, B, q_len, k_len, step.offset, query.device, rows)

            for r in reads:
                r.fn(AttentionCall(step, query, key, rows_of, scaling))
        return new


def cache_offset(kwargs, j, after: int = 0) -> int:
    """Absolute position of the first query of this layer call (``after``: in a forward hook, the cache already
    holds this call's ``after`` positions)."""
    cache = kwargs.get("past_key_values")
    return cache.get_seq_length(j) - after if cache is not None else 0


def allowed_bool(mask, B, q_len, k_len, start, device, rows=None) -> torch.Tensor:
    """The layer's attention mask as booleans [B, 1, q, k] (True = may attend), building the causal one if absent.
    ``rows``: only these query rows (indices into the call's queries)."""
    n = q_len if rows is None else len(rows)
    if mask is None:
        qpos = torch.arange(start, start + q_len, device=device)
        if rows is not None:
            qpos = qpos[rows]
        return (torch.arange(k_len, device=device)[None, :] <= qpos[:, None])[None, None].expand(B, 1, n, k_len)
    mask = mask[..., -q_len:, :k_len]
    if rows is not None:
        mask = mask[..., rows, :]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return allowed.expand(B, 1, n, k_len)


def additive(mask, B, q_len, k_len, start, device, rows=None) -> torch.Tensor:
    """The layer's attention mask as a float32 additive mask [B, 1, q, k] (0 = may attend, -inf = may not); a float
    mask keeps its values (biases included), building the causal one if absent. ``rows``: only these query rows."""
    if mask is not None and mask.dtype != torch.bool:
        m = mask[..., -q_len:, :k_len]
        if rows is not None:
            m = m[..., rows, :]
        m = m.float().expand(B, 1, m.shape[-2], k_len)
        return m.masked_fill(m <= torch.finfo(mask.dtype).min / 2, float("-inf"))
    allowed = allowed_bool(mask, B, q_len, k_len, start, device, rows)
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, float("-inf"))


def inner_function(name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    if name not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"Cannot wrap attention implementation {name!r}; load the model with "
                         "attn_implementation='sdpa' or 'eager'.")
    return ALL_ATTENTION_FUNCTIONS[name]


def fusion_attention_for(inner_name: str):
    """The attention function of `intervene`: the model's own kernel (``inner_name``), with the installation's
    attention edits and reads applied at the layers that have them."""
    if inner_name not in ("sdpa", "eager"):
        raise ValueError(f"Attention-level interventions need attn_implementation 'sdpa' or 'eager', not "
                         f"{inner_name!r}; reload the model with attn_implementation='sdpa'.")
    inner = inner_function(inner_name)
    boolean = inner_name == "sdpa"

    def fusion_attention(module, query, key, value, attention_mask, *args, scaling=None, **kwargs):
        entry = override_of(module)
        if isinstance(entry, tuple) and entry and isinstance(entry[0], Installed) and not entry[0].replaying:
            installed, j = entry
            new = installed.edit_attention(j, query, key, attention_mask, scaling, boolean)
            if new is not None:
                attention_mask = new
        return inner(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)

    return fusion_attention


def ensure_registered(inner_name: str) -> str:
    """Register (once) the attention function that wraps ``inner_name``; returns its registered name."""
    name = f"fusion_{inner_name}"
    return register_attention(name, fusion_attention_for(inner_name), inner_name)


class Intervention:
    """What `intervene` yields: ``.attention`` gives the captured maps after a forward; ``.results`` what any plan
    collected (by the name the plan chose)."""

    def __init__(self, installed: Installed):
        self.installed = installed

    @property
    def results(self) -> dict:
        return self.installed.site.results

    @property
    def attention(self) -> AttentionMaps:
        col = self.results.get("attention")
        if col is None:
            raise ValueError("No attention was captured: add CaptureAttention() to the intervene() call.")
        return col.maps()


@contextmanager
def intervene(lm, batch, *plans):
    """Install ``plans`` on ``lm`` for the prompts of ``batch``; everything is removed on exit, also on errors.

    >>> from fusion_utils.engine import CaptureAttention, MaskImage
    >>> with intervene(lm, batch, MaskImage(3), CaptureAttention()) as run:
    ...     logits = lm.model(**batch.inputs).logits
    >>> tuple(run.attention.values.shape)  # [batch, layers, heads, image tokens]
    (2, 8, 4, 36)
    """
    installed = Installed(lm, batch, plans)
    layers = lm.layers
    if any(override_of(m) is not None for m in attention_modules(lm)):
        raise RuntimeError("This model is already inside an intervene() block; pass all plans to one intervene() call.")
    handles = []
    with ExitStack() as stack:
        try:
            if installed.needs_attention:
                inner = base_implementation(lm)
                stack.enter_context(attention_override(lm, ensure_registered(inner),
                                                       payloads=[(installed, j) for j in range(len(layers))]))
            for j in sorted(installed.inputs):
                handles.append(layers[j].register_forward_pre_hook(installed.pre_hook(j), with_kwargs=True))
            restoring = {j for j, es in installed.inputs.items() if any(e.restore is not None for e in es)}
            for j in sorted(set(installed.outputs) | restoring):
                handles.append(layers[j].register_forward_hook(installed.post_hook(j), with_kwargs=True))
            yield Intervention(installed)
        finally:
            for h in handles:
                h.remove()


__all__ = ["intervene", "Intervention", "Installed", "additive", "allowed_bool", "cache_offset", "ensure_registered"]
