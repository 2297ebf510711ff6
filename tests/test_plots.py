"""fusion_utils.plots on synthetic tables: right number of axes / lines / markers, clear errors on bad input."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from fusion_utils import plots  # noqa: E402
from fusion_utils.paper import reported_layers  # noqa: E402

L = 32
REPORTED = reported_layers("llava")  # 0-based, as paper.py converts the paper's 1-based numbers


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def masking_summary(seed=0, n_layers=L, modes=("zero", "knockout")):
    rng = np.random.default_rng(seed)
    rows = []
    for mode in modes:
        for j in range(n_layers):
            acc = 0.3 + 0.5 * min(j / (0.6 * n_layers), 1) - (0.2 if j == n_layers - 3 else 0) + rng.normal(0, 0.01)
            rows.append(dict(mode=mode, layer=j, accuracy=acc, plain_accuracy=0.8, p_answer=acc, plain_p=0.8, n=10))
    d = pd.DataFrame(rows)
    d["drop"] = d["plain_accuracy"] - d["accuracy"]
    d["delta_p"] = d["p_answer"] - d["plain_p"]
    return d


FOUND = {"zero": {"fusion_layers": [1, 3, 5, 7], "plateau_start": 20, "review_layer": 29, "threshold": 0.05},
         "knockout": {"fusion_layers": [2], "plateau_start": 10, "review_layer": None, "threshold": 0.05}}


def lines_with_gid(fig, gid):
    return [ln for ax in fig.axes for ln in ax.lines if ln.get_gid() == gid]


def n_points(lines):
    return sum(len(ln.get_xdata()) for ln in lines)


# --- masking curves --------------------------------------------------------------------------------------------------

def test_masking_curves_markers_and_lines():
    fig = plots.masking_curves({"LLaVA-1.5": masking_summary(0), "Qwen2-VL": masking_summary(1)},
                               {"LLaVA-1.5": FOUND, "Qwen2-VL": {"zero": {"fusion_layers": [0], "review_layer": None}}})
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    fusion = lines_with_gid(fig, "fusion")
    assert n_points(fusion) == 4 + 1  # red triangles == fusion layers of both models
    assert all(ln.get_marker() == "^" and matplotlib.colors.same_color(ln.get_color(), plots.FUSION_COLOR)
               for ln in fusion)
    assert len([ln for ln in ax.lines if (ln.get_gid() or "").startswith("curve:")]) == 2
    assert len([ln for ln in ax.lines if (ln.get_gid() or "").startswith("unmasked:")]) == 2  # dashed baselines
    assert all(ln.get_linestyle() == "--" for ln in ax.lines if (ln.get_gid() or "").startswith("unmasked:"))
    assert len(lines_with_gid(fig, "review")) == 1  # only LLaVA has a review layer
    assert any("review L29" in t.get_text() for t in ax.texts)
    assert ax.get_xlabel() == "masked decoder layer (0-based)"


def test_masking_curves_mode_metric_and_reported_relative():
    s = {"organism:llava": masking_summary(0, n_layers=8)}
    fig = plots.masking_curves(s, {"organism:llava": FOUND}, mode="knockout", metric="drop", reported=REPORTED,
                               relative=True)
    ax = fig.axes[0]
    assert n_points(lines_with_gid(fig, "fusion")) == 1
    rep = lines_with_gid(fig, "reported")
    assert n_points(rep) == 6 and rep[0].get_markerfacecolor() == "none"  # hollow
    xs = np.concatenate([ln.get_xdata() for ln in ax.lines if (ln.get_gid() or "").startswith("curve:")])
    assert xs.min() >= 0 and xs.max() < 1  # relative depth
    assert np.isclose(lines_with_gid(fig, "reported_review")[0].get_xdata()[0], 28 / 32)  # the paper's 29 of 32, 0-based


def test_masking_curves_accepts_single_found_dict_and_absolute_reported():
    fig = plots.masking_curves({"m": masking_summary(0)}, {"m": FOUND["zero"]}, reported=REPORTED)
    assert n_points(lines_with_gid(fig, "fusion")) == 4
    assert sorted(lines_with_gid(fig, "reported")[0].get_xdata()) == REPORTED["fusion_layers"]


def assert_empty(fig, *words):
    """``fig`` is an empty panel (no data drawn) whose text contains every one of ``words``."""
    reason = plots.empty_reason(fig)
    assert reason is not None, "expected an empty panel saying why, got a figure with data"
    assert not any(ax.lines or ax.images or ax.patches for ax in fig.axes)
    for w in words:
        assert w in reason, (w, reason)


def test_masking_curves_empty_input_gives_an_annotated_panel():
    assert_empty(plots.masking_curves({}), "no masking summaries")
    assert_empty(plots.masking_curves({"m": pd.DataFrame()}), "m", "empty")
    s = masking_summary()
    s["accuracy"] = np.nan
    assert_empty(plots.masking_curves({"m": s}), "all NaN")
    # one model with nothing, one with a curve: the curve is drawn and the other is named in a note
    fig = plots.masking_curves({"empty one": pd.DataFrame(), "m": masking_summary()}, FOUND)
    assert len(lines_with_gid(fig, "curve:m")) == 1 and "empty one" in plots.empty_reason(fig)


def test_masking_curves_errors():
    with pytest.raises(ValueError, match="no mode 'knockout'"):
        plots.masking_curves({"m": masking_summary(modes=("zero",))}, mode="knockout")
    with pytest.raises(ValueError, match="metric"):
        plots.masking_curves({"m": masking_summary()}, metric="f1")
    with pytest.raises(ValueError, match="'accuracy'"):
        plots.masking_curves({"m": masking_summary().drop(columns="accuracy")})
    with pytest.raises(ValueError, match="n_layers"):
        plots.masking_curves({"m": masking_summary()}, reported={"fusion_layers": [1]}, relative=True)


# --- review evidence ---------------------------------------------------------------------------------------------------

def layer_tables():
    h = pd.DataFrame(dict(layer=range(L), hellinger=np.linspace(0.5, 0, L), hellinger_sd=0.05, image_mass=0.1))
    e = pd.DataFrame(dict(layer=range(L), accuracy=np.clip(np.linspace(-0.5, 0.8, L), 0, 1),
                          agreement=np.linspace(0, 1, L), p_final_token=0.5))
    return h, e


def test_review_evidence_three_panels_with_review_line():
    h, e = layer_tables()
    fig = plots.review_evidence(masking_summary(), h, e, FOUND, "LLaVA-1.5")
    assert len(fig.axes) == 3
    assert len(lines_with_gid(fig, "review")) == 3  # one vertical line per panel
    assert n_points(lines_with_gid(fig, "fusion")) == 4
    assert [ax.get_xlabel() for ax in fig.axes] == ["decoder layer (0-based)"] * 3


def test_review_evidence_partial_and_errors():
    h, e = layer_tables()
    fig = plots.review_evidence(None, h, e, {"zero": dict(FOUND["zero"], review_layer=None)})
    assert len(fig.axes) == 2 and not lines_with_gid(fig, "review")
    assert_empty(plots.review_evidence(None, None, None, label="m"), "no masking, Hellinger or early-exit")
    fig = plots.review_evidence(masking_summary(), pd.DataFrame(), e)  # the empty panel says so, the others draw
    assert len(fig.axes) == 3 and "hellinger summary" in plots.empty_reason(fig)
    assert fig.axes[0].lines and not fig.axes[1].lines and fig.axes[2].lines
    with pytest.raises(ValueError, match="'hellinger'"):
        plots.review_evidence(None, h.drop(columns="hellinger"), None)


# --- heatmaps ----------------------------------------------------------------------------------------------------------

IMG = Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype("uint8"))
REL = np.zeros((6, 6), bool)
REL[1:3, 2:4] = True


def test_attention_heatmaps_panels_and_outline():
    maps = np.random.default_rng(0).random((L, 4, 4))
    fig = plots.attention_heatmaps(maps, IMG, [0, 8, 16, 24, 31], REL)
    assert len(fig.axes) == 5
    for ax, j in zip(fig.axes, [0, 8, 16, 24, 31]):
        assert ax.get_title().startswith(f"layer {j}")
        assert len(ax.images) == 2  # image + heatmap overlay
        assert any(isinstance(c, LineCollection) and c.get_gid() == "relevant" for c in ax.collections)
    assert fig.axes[0].images[1].get_interpolation() == "bilinear"


def test_attention_heatmaps_defaults_list_dict_and_strip():
    maps = [np.random.default_rng(j).random((3, 3)) for j in range(12)]
    assert len(plots.attention_heatmaps(maps).axes) == 8  # at most 8 evenly spaced layers
    assert len(plots.attention_heatmaps({3: maps[0], 7: maps[1]}, IMG).axes) == 2
    fig = plots.attention_heatmaps(np.random.random((4, 1, 32)), IMG, [0, 3])
    assert len(fig.axes) == 2 and all("no spatial grid" in ax.get_title() for ax in fig.axes)


def test_attention_heatmaps_errors_and_empty():
    assert_empty(plots.attention_heatmaps([]), "no attention maps")
    assert_empty(plots.attention_heatmaps(np.full((2, 3, 3), np.nan)), "all NaN")
    with pytest.raises(ValueError, match="no map for layer"):
        plots.attention_heatmaps({0: np.ones((2, 2))}, layers=[5])


# --- relevance and noise -----------------------------------------------------------------------------------------------

def attention_summary(scale=1.0):
    return pd.DataFrame(dict(layer=range(L), rel_mass=np.linspace(0.2, 0.6, L) * scale,
                             irr_mass=1 - np.linspace(0.2, 0.6, L) * scale, rel_ratio=np.linspace(1, 3, L),
                             topk_overlap=0.5, entropy=0.9, max_share=0.1))


def test_relevance_curves():
    fig = plots.relevance_curves({"LLaVA-1.5": attention_summary(), "Qwen2-VL": attention_summary(0.8)})
    assert len(fig.axes) == 2
    assert len(fig.axes[0].lines) == 4  # relevant + irrelevant per model
    assert len([ln for ln in fig.axes[1].lines if ln.get_gid() is None]) == 3  # ratio per model + the line at 1
    fig = plots.relevance_curves(attention_summary(), ratio=False, marker_layer=10)
    assert len(fig.axes) == 1 and len(lines_with_gid(fig, "marker")) == 2


def test_relevance_curves_without_relevance_give_an_annotated_panel():
    no_rel = attention_summary().drop(columns=["rel_mass", "irr_mass", "rel_ratio"])
    assert_empty(plots.relevance_curves({"InstructBLIP": no_rel}), "InstructBLIP", "ground-truth regions",
                 "spatial image grid")
    assert_empty(plots.relevance_curves({"m": pd.DataFrame()}), "empty")
    assert_empty(plots.relevance_curves({}), "no attention summaries")
    fig = plots.relevance_curves({"LLaVA-1.5": attention_summary(), "InstructBLIP": no_rel})
    assert len(fig.axes[0].lines) == 2 and "InstructBLIP" in plots.empty_reason(fig)


def test_noise_tokens_and_frequency():
    rng = np.random.default_rng(1)
    m = rng.dirichlet(np.ones(36), L)
    m[:, 5] += 0.3  # a persistent irrelevant token
    m[:, 14] += 0.2  # a persistent relevant token
    m /= m.sum(1, keepdims=True)
    rel = REL.ravel()
    assert not rel[5] and rel[14]
    fig = plots.noise_tokens(m, rel, k=3)
    assert len(lines_with_gid(fig, "noise")) == 1
    assert len(lines_with_gid(fig, "persistent_relevant")) == 1
    with pytest.raises(ValueError, match="shape"):
        plots.noise_tokens(m, rel[:10])
    assert_empty(plots.noise_tokens(m, np.zeros(36, bool)), "no image token", "relevant")
    assert_empty(plots.noise_tokens(m, None), "no token relevance")
    fig = plots.noise_frequency({"most_common_tokens": [(5, 9), (0, 4), (7, 1)],
                                 "irrelevant_share_of_persistent": 0.8})
    assert len(fig.axes[0].patches) == 3 and "80%" in fig.axes[0].get_title()
    assert_empty(plots.noise_frequency({}), "no persistent-noise statistics")
    assert_empty(plots.noise_frequency({"samples": 3, "mean_persistent_tokens": 0.0, "most_common_tokens": []}),
                 "no token was persistent")


# --- contrastive -------------------------------------------------------------------------------------------------------

def test_heatmaps_sit_on_the_views_extent():
    """A centre-cropped view's map covers the middle of a wide image, and its soft-mask hatching follows."""
    img = Image.new("RGB", (80, 40))
    a = np.random.default_rng(0).random((4, 4))
    fig, ax = plt.subplots()
    im = plots.draw_heatmap(ax, a, img, extent=(0.25, 0.0, 0.75, 1.0))
    assert tuple(im.get_extent()) == (20.0, 60.0, 40.0, 0.0)
    assert tuple(plots.draw_heatmap(ax, a, img).get_extent()) == (0.0, 80.0, 40.0, 0.0)
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    fig = plots.contrastive_panels(dict(pre=0, post=3, A_pre=a, A_post=a, I_A=a, image=img, mask=mask,
                                        extent=(0.25, 0.0, 0.75, 1.0)))
    (patch,) = [p for p in fig.axes[3].patches if p.get_gid() == "soft_mask"]
    assert (patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()) == (20.0, 0.0, 10.0, 10.0)
    plt.close("all")


def test_contrastive_panels():
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 4)), rng.random((4, 4))
    view = dict(pre=2, post=31, A_pre=a, A_post=b, I_A=b - a, image=IMG, relevant=REL, mask=(b - a) < -0.3)
    fig = plots.contrastive_panels(view)
    assert len(fig.axes) == 5  # image, A_pre, A_post, I_A + colorbar
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert "layer i*=2" in titles[1] and "layer 31" in titles[2] and "I_A" in titles[3]
    norm = fig.axes[3].images[-1].norm
    assert norm.vcenter == 0 and np.isclose(-norm.vmin, norm.vmax)  # diverging, centred at 0
    assert sum(p.get_gid() == "soft_mask" for p in fig.axes[3].patches) == int(((b - a) < -0.3).sum())
    assert len(plots.contrastive_panels([view, view], colorbar=False).axes) == 8
    strip = dict(pre=0, post=3, A_pre=a.reshape(1, 16), A_post=b.reshape(1, 16), I_A=(b - a).reshape(1, 16),
                 image=IMG, spatial=False)
    assert "no spatial grid" in plots.contrastive_panels(strip).axes[1].get_title()
    with pytest.raises(ValueError, match="'I_A'"):
        plots.contrastive_panels(dict(A_pre=a, A_post=b))
    assert_empty(plots.contrastive_panels([]), "no view")


# --- accuracy tables ---------------------------------------------------------------------------------------------------

def test_accuracy_bars():
    t = pd.DataFrame(dict(method=["ours", "plain", "CD", "plain", "ours", "CD"],
                          accuracy=[59.2, 56.3, 57.4, 66.2, 68.7, 65.6], model=["LLaVA-1.5"] * 3 + ["LLaVA-NeXT"] * 3))
    fig = plots.accuracy_bars(t)
    ax = fig.axes[0]
    bars = [p for c in ax.containers for p in c.patches]
    assert len(bars) == 6
    assert [tk.get_text() for tk in ax.get_xticklabels()][0] == "plain"  # plain first
    assert sum(bool(p.get_hatch()) for p in bars) == 2  # plain hatched, per model
    assert len(plots.accuracy_bars(t[t.model == "LLaVA-1.5"].drop(columns="model")).axes[0].patches) == 3
    assert_empty(plots.accuracy_bars(t.iloc[0:0]), "empty")
    assert_empty(plots.accuracy_bars(t.assign(accuracy=np.nan)), "all NaN")
    with pytest.raises(ValueError, match="'accuracy'"):
        plots.accuracy_bars(t.drop(columns="accuracy"))


def test_ablation_lines():
    t = pd.DataFrame([dict(rho=r, lam=lam, candidates=c, accuracy=0.5 + r * lam, plain_accuracy=0.5)
                      for r in (0.1, 0.2, 0.3) for lam in (0.0, 0.1, 0.5) for c in ("fusion", "all")])
    fig = plots.ablation_lines(t, col="candidates", baseline="plain_accuracy")
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.lines) == 3 + 1  # one per λ + the plain baseline
    fig = plots.ablation_lines(t[t.candidates == "fusion"], x="lam", hue="rho", baseline=0.5)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 4
    with pytest.raises(ValueError, match="'lam'"):
        plots.ablation_lines(t.drop(columns="lam"))
    assert_empty(plots.ablation_lines(t.iloc[0:0]), "ablation table", "empty")


def test_model_colors_stable():
    assert plots.model_color("organism:llava") == plots.model_color("LLaVA-1.5")
    assert plots.model_color("Qwen2-VL") != plots.model_color("Qwen2.5-VL")
    assert plots.model_color("LLaVA-NeXT") != plots.model_color("LLaVA-1.5")
    assert plots.model_color("something") == plots.model_color("something")
