"""Models larger than one device: `load_model(..., device_map=...)` through accelerate, with the decoder split in two.

There is no second GPU here, so the split goes across "cpu" entries: the first half of the decoder's layers on
"cpu", the second half either on "cpu" too (a plain per-layer map) or on "disk" (accelerate offloads those layers'
weights and its hooks load them for each forward: the same hook path a layer on another GPU takes). Logits, the
fingerprint, captured attention, the masking sweeps, early exit and the contrastive second pass must all equal the
single-device model's.
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from fusion_utils import CaptureAttention, MaskImage, intervene, load_model
from fusion_utils.archs import resolve
from fusion_utils.data import load_dataset
from fusion_utils.engine import early_exit_logits, masking_sweep
from fusion_utils.experiments import harness
from fusion_utils.testing import tiny_model_dir

CLOCKS = ["seconds", "plain_seconds"]


def split_map(lm, second: str) -> dict:
    """A device_map naming every leaf-level module: the decoder's layers one by one (first half "cpu", second half
    ``second``), everything else "cpu"."""
    decoder = lm.spec.decoder
    out: dict[str, str] = {}

    def walk(prefix: str, module: torch.nn.Module):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == decoder:
                for sub, grand in child.named_children():
                    if sub == "layers":
                        half = len(grand) // 2
                        for i in range(len(grand)):
                            out[f"{full}.layers.{i}"] = "cpu" if i < half else second
                    else:
                        out[f"{full}.{sub}"] = "cpu"
            elif decoder.startswith(full + "."):
                walk(full + ".", child)
            else:
                out[full] = "cpu"

    walk("", lm.model)
    return out


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def pair(request, tmp_path_factory):
    path = tiny_model_dir(request.param)
    one = load_model(path)
    maps = {second: split_map(one, second) for second in ("cpu", "disk")}
    split = {second: load_model(path, device_map=m, offload_folder=tmp_path_factory.mktemp("offload"))
             for second, m in maps.items()}
    return one, split


@pytest.fixture(scope="module")
def batch_of(pair):
    data = load_dataset("world", n=3)
    return lambda lm: lm.prepare(list(data))


@pytest.mark.parametrize("second", ["cpu", "disk"])
def test_split_decoder_gives_the_same_logits_fingerprint_and_capture(pair, batch_of, second):
    one, split = pair
    lm = split[second]
    assert lm.meta["device_map"][f"{lm.spec.decoder}.layers.{lm.num_layers - 1}"] == second
    if second == "disk":  # really offloaded: accelerate's hooks bring the weights in for each forward
        assert next(lm.layers[-1].parameters()).device.type == "meta" and hasattr(lm.layers[-1], "_hf_hook")
    assert lm.fingerprint == one.fingerprint and lm.device == one.device
    b1, b2 = batch_of(one), batch_of(lm)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(**b2.inputs).logits, one.model(**b1.inputs).logits, rtol=0, atol=1e-6)
        with intervene(one, b1, CaptureAttention(), MaskImage(1, mode="knockout")) as r1:
            l1 = one.model(**b1.inputs).logits
        with intervene(lm, b2, CaptureAttention(), MaskImage(1, mode="knockout")) as r2:
            l2 = lm.model(**b2.inputs).logits
    torch.testing.assert_close(l2, l1, rtol=0, atol=1e-6)
    a1, a2 = r1.attention, r2.attention
    assert a2.layers == a1.layers == list(range(one.num_layers))
    torch.testing.assert_close(a2.values, a1.values, rtol=0, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("second", ["cpu", "disk"])
def test_split_decoder_gives_the_same_sweeps(pair, batch_of, second):
    one, split = pair
    lm = split[second]
    b1, b2 = batch_of(one), batch_of(lm)
    for mode in ("zero", "knockout"):
        s1, s2 = masking_sweep(one, b1, mode=mode), masking_sweep(lm, b2, mode=mode)
        torch.testing.assert_close(s2["logits"], s1["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(early_exit_logits(lm, b2), early_exit_logits(one, b1), rtol=0, atol=1e-5)


def test_split_decoder_gives_the_same_experiment_records(pair, tmp_path):
    """Masking (generate) and contrastive (its second pass replays the decoder from the apply layer) end to end."""
    one, split = pair
    lm = split["disk"]
    data = load_dataset("world", n=3)
    for name, params in (("masking", dict(modes=("zero", "knockout"), decode="generate")),
                         ("contrastive", dict(fusion_layers=[0, 1], apply_layer=2))):
        r1 = harness.run(name, one, data, out=str(tmp_path / "one"), batch_size=3, progress=False, **params)
        r2 = harness.run(name, lm, data, out=str(tmp_path / "split"), batch_size=3, progress=False, **params)
        keep = [c for c in r1.records.columns if c not in CLOCKS]
        pd.testing.assert_frame_equal(r2.records[keep].reset_index(drop=True), r1.records[keep], atol=1e-5, rtol=0)
        assert r2.config["model"]["fingerprint"] == one.fingerprint


def test_device_map_arguments_are_checked():
    path = tiny_model_dir("llava")
    with pytest.raises(ValueError, match="device_map"):
        load_model(path, max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="not both"):
        load_model(path, device="meta", device_map="auto")
    lm = load_model(path)
    with pytest.raises(ValueError, match="offload_folder"):
        load_model(path, device_map=split_map(lm, "disk"))
    assert resolve(lm.model, lm.spec.decoder) is lm.decoder


def test_cli_device_map_option_names_its_fix(capsys):
    from fusion_utils.cli import main

    code = main(["run", "masking", "--model", str(tiny_model_dir("llava")), "--samples", "1", "--device-map", "nowhere"])
    assert code == 2 and "--device-map 'nowhere'" in capsys.readouterr().err
