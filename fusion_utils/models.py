"""Loading a multimodal LLM with its processor, and identifying it (the fingerprint every result records).

`load_model` accepts a hub id, a local directory written by `save_pretrained` (model + processor), or
``organism:NAME`` for the model organisms shipped with the package. Weights load from safetensors only and remote
code is refused unless the caller opts in (``allow_pickle=True`` / ``trust_remote_code=True``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .archs import ArchSpec, get_spec, resolve, supported

ORGANISM_PREFIX = "organism:"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def organism_dir(name: str) -> Path:
    """Directory of a shipped model organism (``organism:llava``, ``llava`` or a variant such as ``llava-8l``)."""
    from .organism_registry import DEFAULT_VARIANT, VARIANTS, weights_dir

    name = name[len(ORGANISM_PREFIX):] if name.startswith(ORGANISM_PREFIX) else name
    # `llava` / `qwen2_vl` name the default variant of each architecture (`llava-8l`, `llava-32l`, ...)
    known = name in DEFAULT_VARIANT or name in VARIANTS
    path = weights_dir(name) if known else Path(__file__).parent / "organisms" / "weights" / name
    if not (path / "config.json").is_file():
        shipped = sorted(p.name for p in path.parent.glob("*") if (p / "config.json").is_file()) if path.parent.is_dir() else []
        raise ValueError(
            f"No model organism named {name!r}; shipped organisms: {', '.join(shipped) or 'none'} "
            "(retrain them with `make organisms`)."
        )
    return path


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}.") from None


@dataclass
class LoadedModel:
    """A model, its processor and its architecture spec, plus the handles the interventions use."""

    model: torch.nn.Module
    processor: object
    spec: ArchSpec
    name: str
    fingerprint: str
    meta: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return getattr(self.model.config, "text_config", self.model.config)

    @property
    def decoder(self) -> torch.nn.Module:
        return resolve(self.model, self.spec.decoder)

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.decoder.layers

    @property
    def attention_modules(self) -> list[torch.nn.Module]:
        """Each decoder layer's attention module (`ArchSpec.attention`), whose kernel the attention plans wrap."""
        return [resolve(layer, self.spec.attention) for layer in self.layers]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> torch.nn.Module:
        return self.decoder.norm

    @property
    def lm_head(self) -> torch.nn.Module:
        return resolve(self.model, self.spec.lm_head)

    @property
    def image_token_id(self) -> int:
        return image_token_id(self.model.config, self.spec, self.processor)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device, or with a ``device_map`` the device of its first (embedding) entry."""
        first = self.meta.get("input_device")
        return torch.device(first) if first is not None else next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @classmethod
    def wrap(cls, model: torch.nn.Module, processor, name: str | None = None) -> "LoadedModel":
        """A model already in memory (e.g. one in training) as a `LoadedModel`, so the harness runs on it as on a
        loaded one. The fingerprint is taken now: a model whose weights change afterwards needs wrapping again.

        >>> from fusion_utils import organism_registry
        >>> lm = LoadedModel.wrap(*organism_registry.load("llava-8l"), name="llava-8l")
        >>> lm.spec.model_type
        'llava'
        """
        spec = get_spec(model.config.model_type)
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # batched generation needs left padding, as `load_model` sets it
        name = name or getattr(model.config, "_name_or_path", None) or f"in-memory {spec.model_type}"
        lm = cls(model, processor, spec, str(name), model_fingerprint(model),
                 meta={"attn_implementation": current_attention(resolve(model, spec.decoder))})
        lm.image_token_id  # fail early when the id is missing
        return lm

    def set_attention(self, implementation: str) -> None:
        """Switch the decoder's attention kernel (``"sdpa"``, ``"eager"``, ...) through transformers' public
        ``set_attn_implementation``; the engine's attention edits wrap whichever kernel is set here.

        >>> lm.set_attention("eager"); out = lm.model(**batch.inputs, output_attentions=True); lm.set_attention("sdpa")
        """
        self.decoder.set_attn_implementation(implementation)
        self.meta["attn_implementation"] = implementation

    def prepare(self, samples, **kwargs):
        """Model inputs and image-token bookkeeping for a list of samples (see `fusion_utils.adapters.prepare`)."""
        from .adapters import prepare

        return prepare(self, samples, **kwargs)

    def __repr__(self) -> str:
        return (f"LoadedModel({self.name!r}, arch={self.spec.model_type}, layers={self.num_layers}, "
                f"device={self.device}, dtype={self.dtype}, fingerprint={self.fingerprint})")


def image_token_id(config, spec: ArchSpec, processor=None) -> int:
    for attr in spec.image_token_attrs:
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None and getattr(processor, "image_token", None) is not None:
        return int(tok.convert_tokens_to_ids(str(processor.image_token)))
    raise ValueError(f"Cannot find the image token id of this {spec.label} model; set config.image_token_id.")


def _read_local_config(path: Path) -> dict:
    with open(path / "config.json") as f:
        return json.load(f)


def placement_kwargs(device, device_map, max_memory, offload_folder) -> dict:
    """``from_pretrained``'s placement arguments for a ``device_map`` (none without one), checked first."""
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("max_memory and offload_folder only apply with a device_map; pass device_map=\"auto\" "
                         "(or a dict) as well.")
    if device_map is None:
        return {}
    if str(device) != "cpu":
        raise ValueError(f"Pass either device={device!r} or device_map, not both: the map places every module.")
    try:
        import accelerate  # noqa: F401  (transformers dispatches a device_map through it)
    except ImportError:
        raise ValueError("device_map needs the accelerate package; pip install accelerate.") from None
    if any(v == "disk" for v in (device_map.values() if isinstance(device_map, dict) else ())) \
            and offload_folder is None:
        raise ValueError("device_map sends modules to \"disk\"; pass offload_folder=DIR for their weights.")
    kwargs = dict(device_map=device_map, max_memory=max_memory)
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def current_attention(module) -> str | None:
    """The attention implementation a model or decoder was built with. transformers 5 has a public setter
    (``set_attn_implementation``) but no getter, so this is the one place that reads its configuration's field."""
    return getattr(module.config, "_attn_implementation", None)


def load_model(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype=None,
               attn_implementation: str = "sdpa", trust_remote_code: bool = False, allow_pickle: bool = False,
               revision: str | None = None, device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_folder: str | os.PathLike | None = None) -> LoadedModel:
    """Load a supported MLLM and its processor.

    ``name_or_path``: a hub id (``llava-hf/llava-1.5-7b-hf``), a local ``save_pretrained`` directory, or
    ``organism:llava`` / ``organism:qwen2_vl``. ``dtype`` defaults to the checkpoint's own (fp32 for organisms);
    pass ``"bfloat16"`` on a GPU. Captured attention is always computed in float32 whatever the model dtype.

    A model larger than one GPU: ``device_map="auto"`` (or ``"balanced"``, or a dict module name -> device, as in
    transformers) spreads its layers over the visible GPUs through accelerate, within ``max_memory`` (e.g.
    ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``); entries mapped to ``"disk"`` are offloaded to
    ``offload_folder``. ``device`` is then left to the map. Every plan, capture and sweep works with the decoder's
    layers on different devices (masks move to each layer's device; captured rows gather on the input device).
    """
    from transformers import AutoConfig, AutoProcessor
    import transformers

    name = str(name_or_path)
    device = distributed.device_for(device)  # under a launcher, a bare "cuda" is this rank's GPU
    source = str(organism_dir(name)) if name.startswith(ORGANISM_PREFIX) else name
    local = Path(source).is_dir()
    if local:
        raw = _read_local_config(Path(source))
        model_type = raw.get("model_type")
        if "auto_map" in raw and not trust_remote_code:
            raise ValueError(f"{name} declares remote code (auto_map); pass trust_remote_code=True only if you trust it.")
        if not allow_pickle and not any(Path(source).glob("*.safetensors")):
            raise ValueError(f"{name} has no .safetensors weights; convert them, or pass allow_pickle=True if you "
                             "trust the pickle files.")
        get_spec(model_type)  # unsupported architecture -> one clear sentence before any heavy work
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ValueError(f"{name} needs remote code; pass trust_remote_code=True only if you trust it.") from None
        raise
    except OSError as err:
        if local:
            raise
        raise OSError(f"Could not load {name!r}: it is not a local directory and the Hugging Face Hub did not give "
                      f"it ({type(err).__name__}); without a network, pass the path of a local save_pretrained "
                      "directory, or set HF_HOME to a cache that holds the model and HF_HUB_OFFLINE=1.") from None
    spec = get_spec(config.model_type)
    cls = getattr(transformers, spec.model_class)
    kwargs = dict(attn_implementation=attn_implementation, use_safetensors=not allow_pickle or None,
                  trust_remote_code=trust_remote_code, revision=revision)
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    kwargs.update(placement_kwargs(device, device_map, max_memory, offload_folder))
    model = cls.from_pretrained(source, **kwargs)
    if device_map is None:
        model.to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"  # batched generation needs left padding
    meta = {"source": source, "attn_implementation": attn_implementation}
    # transformers keeps the map only when it dispatched (an all-"cpu" dict places nothing): record what was asked
    placed = getattr(model, "hf_device_map", None) or (device_map if isinstance(device_map, dict) else None)
    if device_map is not None and placed:
        meta["device_map"] = {k: str(v) for k, v in placed.items()}
        meta["input_device"] = str(map_device(next(iter(placed.values()))))
    lm = LoadedModel(model, processor, spec, name, model_fingerprint(model), meta=meta)
    lm.image_token_id  # fail early when the id is missing
    return lm


def map_device(value) -> torch.device:
    """The torch device of a ``hf_device_map`` value: a GPU index, a device name, or "disk" (computed on CPU)."""
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device("cpu" if str(value) == "disk" else str(value))


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap content hash of a loaded model: its config plus, for every parameter, name, shape, dtype and a
    strided sample of its values. Equal weights give equal fingerprints, whatever file or hub they came from, and
    however a device_map placed them (offloaded weights are read back from their offload)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "_attn_implementation_autoset", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    state = model.state_dict()
    if any(p.device.type == "meta" for p in state.values()):
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        loaded = get_state_dict_offloaded_model(model)
        state = {k: loaded[k] for k in state}  # the model's own order: the hash must not depend on placement
    with torch.no_grad():
        for pname, p in state.items():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 512)
            sample = flat[::step][:512].float().cpu().numpy().tobytes()
            h.update(f"{pname}|{tuple(p.shape)}".encode())
            h.update(sample)
    return h.hexdigest()[:16]


def checkpoint_fingerprint(name_or_path: str | os.PathLike) -> str:
    """Fingerprint of a model *without loading it*: config + safetensors headers + sampled bytes of local weights.
    For a hub id that is not on disk, the id itself (the build cache then keys on the name)."""
    name = str(name_or_path)
    path = organism_dir(name) if name.startswith(ORGANISM_PREFIX) else Path(name)
    if not path.is_dir():
        return "hub:" + name
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)
            fh.seek(max(0, size - (1 << 20)))
            tail = fh.read()
        h.update(f"{f.name}|{size}".encode() + head + tail)
    return h.hexdigest()[:16]


__all__ = ["LoadedModel", "load_model", "model_fingerprint", "organism_dir", "supported"]
