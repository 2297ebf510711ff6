"""Side by side: the contrastive answer with the attention soft mask and with the hidden-state soft mask, each as a
ratio to the plain greedy answer (the bench's 32-layer tiny LLaVA, one thread, alternating repetitions, medians).

    python benchmarks/soft_mask_latency.py   # prints {"att": ratio, "hid": ratio}
"""
import time, statistics, torch
torch.set_num_threads(1)
from fusion_utils import load_model
from fusion_utils.data.sample import Sample
from fusion_utils.experiments.common import Decoding, generate
from fusion_utils.experiments.contrastive import contrastive_answer
from fusion_utils.testing import sample_images, tiny_model_dir
lm = load_model(tiny_model_dir("llava", num_layers=32, image_size=336))
s = Sample("q", sample_images(3, seed=0)[2], "what is the color of the large object on the left side?", ["red"])
dec = Decoding(max_new_tokens=4)
b = lm.prepare([s])
def plain(): generate(lm, b, (), dec)
def att(): contrastive_answer(lm, [s], fusion_layers=[2,4,8], apply_layer=28, decoding=dec)
def hid(): contrastive_answer(lm, [s], fusion_layers=[2,4,8], apply_layer=28, decoding=dec, soft_mask="hidden_state")
for f in (plain, att, hid): f()
r = {"att": [], "hid": []}
for _ in range(5):
    t=time.perf_counter(); plain(); tp=time.perf_counter()-t
    t=time.perf_counter(); att(); ta=time.perf_counter()-t
    t=time.perf_counter(); hid(); th=time.perf_counter()-t
    r["att"].append(ta/tp); r["hid"].append(th/tp)
print({k: round(statistics.median(v),3) for k,v in r.items()})
