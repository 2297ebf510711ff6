"""The staged training recipe of the organisms (mirrors how real MLLMs are built).

(a) ``text``   -- pretrain the decoder on TEXT scenes: the image-token slots hold the embeddings of scene tokens (one
                  per cell: ``<large_red_circle>`` or ``<empty>``, lightly noised), followed by the question in the
                  exact evaluation prompt; loss on the answer token + EOS only.
(b+c) ``vision`` -- train the vision tower and projector (decoder frozen) so that each image token lands on its
                  cell's scene-token embedding: cross-entropy over the 41 scene tokens with logits = -squared
                  distance to their embeddings, plus the mean squared error to the target embedding. A few blank
                  (uniform) images teach "all empty"; with ``vision_zoom``, crops of the images teach a magnified cell
                  (each token's target is the cell it shows), as the crop methods feed them.
(d) ``joint``  -- VQA on rendered images end to end (every parameter, lower learning rate), answer + EOS loss, with the
                  alignment loss of (b+c) kept as a small auxiliary term.
(e) ``two``    -- prompts with two image placeholders, [original, original] or [original, a crop of it], mixed with
                  one-image prompts; the answer is unchanged (the deep organisms; `fusion_utils.organisms.two_images`).

Everything is deterministic in ``seed`` (torch.manual_seed, numpy streams of the world, fixed thread count).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import world
from ..prompts import POST_PROMPT, render_prompt, user_text
from . import arch_of, resolve_name
from .build import N_IMAGE_TOKENS, build
from .train_fine import FineStage

# steps per stage and learning rates (sized for about 30 min per organism on one core of this machine; qwen2_vl needs
# more, see ORGANISM_RECIPE and the model cards)
RECIPE = {
    "batch": 64,
    "vision_batch": 32,
    "joint_batch": 32,
    "text_max_minutes": None,  # no wall-clock guard by default: a time-based stop would make retraining irreproducible
    "text_steps": 3600, "text_lr": 1e-3,  # max steps; stops early once text-scene val accuracy passes the target
    "text_check_every": 250, "text_target": 0.97, "text_family_target": 0.93,
    # training family mix after the curriculum below: count 2x and spatial (the slowest family) 3x; evaluation stays
    # balanced. Without the curriculum, count and spatial 2x starved the colour answers (attribute 0.63 on text scenes
    # after 3500 steps); with it, attribute is learned first and ends at 0.95 (shipped LLaVA organism)
    "train_families": ("attribute", "identity", "existence", "count", "count", "spatial", "spatial", "spatial"),
    # family curriculum: the single-lookup families first, then count, then everything. Measured on stage (a) alone
    # (LLaVA, 2000 of 3600 steps, 500 val questions): 0.83 text-scene accuracy, against 0.76 after 2750 steps without
    # it; attribute no longer sits at chance for the first ~1000 steps
    "family_stages": ((0.17, ("attribute", "identity", "existence")), (0.33, ("attribute", "identity", "existence",
                                                                              "count"))),
    "pack": 1,  # questions per scene (>1 packs more user/assistant turns on the same scene; slower per minute here)
    # >1: questions per scene in stages (a) and (d), isolated blocks that share the scene prefix (4D mask). 4 blocks of
    # batch 32 process 1.7x the questions per second of batch 64 but learned no more per step (0.80 vs 0.83 after 2000
    # steps): the recipe is step-limited, so it is off by default; batch 32 without blocks was also no faster per minute
    "blocks": 1,
    "pack_short": True,  # packed turns omit the post-prompt
    "curriculum": 0.0,  # >0: the first fraction of stage (a) thins scenes to k objects (slower per minute here)
    "qk_init_std": 0.15,  # decoder q/k projections start larger than the 0.02 default: content-selective attention
    "vision_steps": 1000, "vision_lr": 3e-3, "align_ce": 0.1,
    # share of each stage (b+c) batch given as a crop of its image (relevant cells or a random box), each token's target
    # the cell it magnifies: without it the tower reads a magnified object as nothing it knows (below). With
    # `vision_zoom_target` "first" (default "every") only the first token showing a cell gets its object, the others
    # `<empty>`: a magnified object stays one token, so a decoder that counts tokens counts it once
    "vision_zoom": 0.0,
    "joint_steps": 400, "joint_lr": 3e-4, "joint_aux": 0.3,
    "joint_part": "all",  # what stage (d) trains: "all", or "vision" (tower + projector; the decoder stays as in (a))
    "scene_noise": 0.15, "blank_frac": 0.05,
    "compose_scene": True,  # (a) a cell's embedding = E[size] + E[colour] + E[shape] (E[<empty>] if empty)
    # (e) two images per prompt (issue 16), off for the 8-layer organisms (shipped before it existed)
    "two_steps": 0, "two_lr": 2e-4, "two_batch": 32, "two_part": "lm",
    "two_kinds": ("one", "same", "relevant", "irrelevant", "random"),
    # (f) small details (issue 28's world-fine; `train_fine.FineStage`), off unless an organism's recipe sets steps
    "fine_steps": 0, "fine_lr": 2e-4, "fine_batch": 32, "fine_share": 0.5, "fine_part": "all", "fine_aux": 0.3,
    "fine_kinds": ("one", "one", "same", "relevant", "relevant", "relevant", "irrelevant", "random"),
}

# per-organism departures from RECIPE. Qwen2-VL (measured on seed 0, 500 `test` questions, one torch thread):
# - spatial joins the first curriculum phase: its M-RoPE decoder learns "left of / above" slowest (shipped before
#   with spatial introduced last: text-scene val 0.89, spatial 0.65 when the budget ran out; 78.2% on images);
# - up to 4400 text steps (it stopped early at 3500 with text-scene val 0.98); with at most 3600 steps the same
#   recipe stopped at 0.925 (identity 0.78) and scored 88.6% on images: the cosine schedule's length matters;
# - 1000 vision steps, as for LLaVA (after them cell accuracy 0.997; small crosses and circles 0.87-0.97);
# - no joint stage: from one vision checkpoint (85.8% without it), 400 joint steps scored 82.2% at lr 3e-4, 84.6% at
#   lr 1e-4, and 72.2% training only the tower + projector at lr 1e-3 (`joint_part` "vision"); extra scene noise
#   (0.3) in stage (a) lowered every stage's validation accuracy.
# Result: 91.4% (every family >= 85%), 46 min on one core; about 0.45 s/step with 2 threads against 0.61 with 1.
_QWEN_CURRICULUM = ((0.17, ("attribute", "identity", "existence", "spatial")),
                    (0.33, ("attribute", "identity", "existence", "count", "spatial")))
_QWEN_8L = {"text_steps": 4400, "vision_steps": 1000, "joint_steps": 0, "family_stages": _QWEN_CURRICULUM}
# The deep organisms (issue 16; sizes and the seconds/step behind them in build.SIZES) start from their 8-layer
# architecture's recipe and add stage (e): before it, the same image twice cost the 8-layer llava 31 points and qwen2_vl
# 39 (`scripts/two_image_control.py`), because every training prompt had one image. Stage (e) trains the decoder only
# (the vision tower already maps each cell onto its scene token, and the Qwen organism lost accuracy whenever stage (d)
# moved its tower) on a mix of one-image prompts, which keep the one-image accuracy, and the four two-image kinds
# the crop methods and their controls produce.
# Measured (seed 0, one torch thread, this 2-core machine shared with three other engineers' jobs, 2026-11-30):
# - llava-32l, stages (a)-(d) of the llava recipe: 60.5 min ((a) 3600 steps in 52.5 min, 0.87 s/step against 0.47 in
#   the timing probe: the machine's load average was 5-9). Text-scene val accuracy (200 questions) every 250 steps:
#   0.40 0.49 0.57 0.65 0.68 0.76 0.69 0.76 0.78 0.76 0.78 0.79 0.80 0.80; it ended at 0.795 (spatial 0.55, identity
#   0.70), a plateau from step ~1500, where the 8-layer llava reached 0.935 by step 2750. On 500 test questions after
#   (d): 73.6% (attribute 77, identity 73, existence 82, count 91, spatial 45), blank 16.4%; same image twice 44.6%,
#   [original, relevant crop] 24.6%, [original, irrelevant crop] 20.2%. The 32 x 32 decoder misses the bar before any
#   two-image training: depth at this width is the bottleneck, not stage (e).
# - then stage (e), 400 steps (8.2 min): 71.2% with one image (-2.4), same image twice 69.4% (-1.8 against one image:
#   inside the bar's 3 points, from -29.0), relevant crop 65.4% (-5.8, from -49.0), irrelevant crop 59.4% (-11.8);
#   but blank rose to 32.6% (attribute, identity and spatial answered above chance without the image), so the
#   blank-image gap fell from 57 to 39 points. `fusion-utils organisms card llava-32l --dir DIR` prints these tables.
# - llava-16l (16 layers x 48, 3 heads; the shallowest allowed depth), same recipe: stage (a) in ~51 min,
#   text-scene val 0.38 0.49 0.54 0.58 0.66 0.75 0.74 0.76 0.77 0.79 0.80 0.82 0.83 0.83, ending at 0.835 (spatial
#   0.675, identity 0.775). Halving the depth and widening by half moved the plateau by 3-4 points only: at this recipe
#   (lr 1e-3, q/k init 0.15, 3600 steps) both deeper decoders stall near 0.80 where the 8 x 64 one reaches ~0.94.
#   All five stages: 61.7 min; on 500 test questions 75.4% (attribute 74, identity 73, existence 85, count 88, spatial
#   57), blank 27.0%, same image twice 70.0% (-5.4), relevant crop 68.2% (-7.2), irrelevant crop 64.8% (-10.6); on 200
#   val questions stage (d) lowered it from 0.80 to 0.74 and stage (e) to 0.715, as stage (d) did for the 8-layer qwen2_vl.
# - then (session of 2026-11-30, 05:00-08:00) 16 layers at the 8-layer width (64, 4 heads; depth the only change from
#   the 8-layer organisms), both organisms at once, one core each with the machine's load average 3-4:
#   - llava-16l, the llava recipe: stage (a) 3600 steps in 49.8 min (0.83 s/step), text-scene val every 250 steps
#     0.51 0.53 0.62 0.64 0.75 0.74 0.78 0.74 0.83 0.87 0.87 0.88 0.91 0.90, spatial only 0.13-0.63 throughout (at
#     width 48 the same depth ended at 0.835: width mattered). Stages (b)-(e) 10.2 min, 60.0 min in all; on 500 test
#     questions 81.2% (attribute 88, identity 89, existence 98, count 85, spatial 46), blank 31.2%, same image
#     twice 75.4%, relevant crop 68.0%, irrelevant crop 70.0%: spatial misses the bar, and stage (d) lowered it (val 0.53 -> 0.43).
#   - qwen2_vl-16l, the qwen2_vl recipe (spatial in the first curriculum phase): text-scene val 0.50 0.51 0.57 0.69
#     0.74 0.74 0.82 0.88 0.94 0.91 0.95 0.95 0.96 0.97 0.96 0.95 0.96 (spatial 1.0 from step 2500); all 4400 steps
#     in 68.4 min (0.93 s/step), vision 5.2 min. With 400 two-image steps: 91.4% (identity 82), blank 33.0%, same
#     image twice 84.0% (-7.4), relevant crop 69.0%. 1200 two-image steps instead (17.6 min; shipped then,
#     91.2 min in all): 93.4% (families 87-100), blank 31.8%, same image twice 87.8% (-5.6), relevant crop 78.4%,
#     irrelevant crop 71.0%. Longer stage (e) closes the two-image gaps only slowly.
#   So at 16 layers the LLaVA decoder (1-D RoPE over row-major image tokens) learns "left of / above" late, as the
#   Qwen one did at 8 layers; llava-16l therefore takes qwen2_vl's curriculum, spatial from the start: text-scene val
#   0.39 0.46 0.61 0.66 0.76 0.76 0.81 0.78 0.85 0.87 0.91 0.91 0.91 0.91 (spatial 1.0 from step 1750), 3600 steps in
#   36 min with a core to itself for most of it, 43.8 min in all (shipped then). On 500 test questions 85.0%
#   (attribute 80, identity 81, existence 87, count 83, spatial 94), blank 32.0%, same image twice 77.6% (-7.4), relevant crop 76.8%,
#   irrelevant crop 74.6%: spatial is solved, but the other families lose 3-9 points between the text stage (0.91) and
#   images, and stages (d) and (e) each cost val accuracy (0.85 -> 0.84 -> 0.78).
# - then (session of 2026-11-30, 08:00-10:00; one core each, the other core training too). The two-image gaps had a
#   cause upstream of stage (e): the frozen tower could not read a crop. `scripts/tower_reads_crops.py` (200 val
#   questions, crop of the relevant cells padded by one cell, each token scored against the cell under its centre):
#   of the occupied cells, 0.98 (qwen2_vl-16l) and 0.93 (llava-16l) right on whole images, 0.16 and 0.08 on magnified
#   crops (the Qwen figure from the same scoring under the processor of then). Stage
#   (e) could only teach the decoder to ignore the crop, and a crop could not help.
#   - Qwen2-VL: hub Qwen2-VL reads an image at its own resolution, but the organisms' processor resized every image to
#     96 x 96 px of area, magnifying crops. With crops at their own size (build.MIN_PIXELS; one token per cell, read at
#     0.97), the same 1200 two-image steps from the same vision checkpoint: 92.8% with one image, blank 30.0, same image
#     twice 92.2 (-0.6), relevant crop 90.4 (-2.4), irrelevant crop 87.0 (were 87.8 / 78.4 / 71.0); 2400 steps: 93.4,
#     30.2, 93.6, 90.8, 88.6. The relevant crop lifts identity (86 -> 91) but costs count (95 -> 82: the decoder counts
#     the crop's objects too, answering 3 or 4) and spatial (99 -> 94). 2400 steps at lr 3e-4 with the relevant crop
#     drawn twice as often (_TWO_16L; the shipped weights, 105.1 min): 94.0% (families 87-100), blank 29.2, twice 93.0,
#     relevant crop 94.0 (identity 93, count 92), irrelevant crop 87.4: the whole bar, the crop part with no margin.
#     A tower taught magnified crops instead (half
#     of 1000 vision steps, `vision_zoom`) read them at 0.36 and whole images at 0.86 (image val 0.93 -> 0.825): dropped.
#   - LLaVA: CLIP's processor magnifies a crop to 96 px, as hub LLaVA's does, so the tower has to read magnified cells.
#     llava-16l on qwen2_vl's text recipe (4400 steps, no joint stage) reaches text-scene val 0.93 (identity 0.825) against
#     0.91 with 3600; image val after 1000 vision steps 0.85, after 3000 0.915 (the tower was the bottleneck, and it
#     costs 1.5 min per 1000 steps); with 1000 vision steps and 1200 two-image steps, 89.2%, blank 26.4, twice 83.4,
#     relevant crop 81.8, 54.0 min. 6000 vision steps, half of them magnified crops (`vision_zoom` 0.5): image val 0.895,
#     magnified occupied cells read at 0.55 (from 0.08), whole images at 0.92. Then 1200 two-image steps: 89.4%, blank
#     30.0, twice 85.8, relevant crop 82.6 -- with attribute 99 and identity 88 against 88 and 79 from one image (the
#     zoom helps, as the paper's crop variant and ViCrop assume) but count 44 against 92 (a magnified object spans
#     several tokens, and they are counted); 2400 steps (shipped then, 73.2 min): 90.4% (families 83-96),
#     blank 29.8, twice 87.0 (-3.4), relevant crop 85.0 (attribute 98, identity 87, count 54), irrelevant crop 78.8.
#     Stage (e) as _TWO_16L instead: 88.8%, twice 86.4, relevant crop 88.6 (count 64); with the one-image prompts
#     also drawn twice as often (lr 2e-4): 89.8%, twice 86.2, relevant crop 85.2. Neither beats the shipped one.
# - then (session of 2026-11-30, 10:40-13:30), llava-16l from the same stage (b+c) checkpoint:
#   - stage (e) with count drawn 3/8 and identity 2/8 (`two_families`): 91.2% (count 96), blank 28.4, twice 87.8
#     (-3.4; count 86), relevant crop 85.2 (count 58), irrelevant crop 79.4: counting with two images barely moves.
#   - Why LLaVA and not Qwen2-VL: the organisms' word-level tokenizer dropped the chat template's newline, so LLaVA's
#     [original, crop] was one run of 72 image tokens, nothing marking where the first image ends (hub LLaVA's Llama
#     tokenizer keeps "\n" between them; Qwen2-VL has <|vision_start|> / <|vision_end|> around each image, and its
#     M-RoPE gives each image its own temporal position). build.NEWLINE_TOKEN keeps it (the runs below).
#     The same stage (b+c) checkpoint with an embedding row added for the newline, then the shipped stage (e): 89.2%,
#     blank 28.4, twice 85.6 (count 85), relevant crop 84.8 (count 60), irrelevant crop 78.2. A separator the decoder
#     first meets in stage (e) does not help.
#   - Is it the tower's reading, or the decoder? Perfect text boards instead of images (`_two_board_batch`; 400 val
#     questions) on the stage (a) checkpoint: one board 0.86 (the new newline row untrained), [board, same board] 0.56
#     (count 0.25), [board, relevant crop's board] 0.61 (count 0.20). After 800 more stage (a) steps at lr 3e-4 with
#     half the prompts two boards (`text_two` 0.5): 0.92, 0.82 (count 0.74, identity 0.66), 0.83 (count 0.46), with
#     irrelevant 0.735 and random 0.72. The decoder, not the tower: once its circuits have formed on one board, it
#     learns only slowly to answer from the first of two. Stage (a) with two-board prompts from the start
#     (`text_two`) is the candidate. From scratch with 0.3 of stage (a)'s prompts two boards (and the newline), text
#     boards at step 2900 / 3700 of 4400: one 0.865 / 0.917, same 0.825 / 0.870 (identity 0.66 / 0.69), relevant
#     0.833 / 0.873 (count 0.50 / 0.65), irrelevant 0.748 / 0.770: the gaps narrow slowly; stopped at step 3700 (its
#     checkpoints are kept, see the session note), no image run yet.
#   - the tower taught a magnified object on its first token only (`vision_zoom_target` "first", 6000 vision steps as
#     before, then the shipped stage (e); the shipped weights, 73.8 min): 90.6% (families 82-97), blank 27.4, twice
#     88.4 (-2.2; count 84), relevant crop 87.8 (count 81 from 54, but attribute 91 from 98 and identity 79 from 87:
#     the crop's object is one token now, so the crop magnifies less of what it shows), irrelevant crop 85.4. Every
#     two-image number rises; the relevant crop stays 2.8 points below one image. `scripts/tower_reads_crops.py`: the
#     occupied cells' first tokens of magnified crops read at 0.39 (whole images 0.94). Its decoder on perfect text
#     boards (`scripts/decoder_reads_two_boards.py`, 400 val questions): one 0.917, same 0.88 (count 0.79), relevant
#     0.89 (count 0.69 against 0.96), irrelevant 0.88, random 0.875 -- the images' 3-point gap: the decoder's counting
#     with two images is what remains, not the tower.
#   - the same "first" tower, stage (e) at lr 3e-4 with the relevant crop drawn twice as often and the count- and
#     identity-heavy mix (`two_families` as above; 73.7 min): 91.0%, blank 24.2, twice 90.2 (-0.8), relevant crop 89.6
#     (-1.4; count 86, identity 82), irrelevant crop 87.0 -- better on every number, still 1.4 below one image.
#   - then (session of 2026-11-30, 13:30-16:30), stage (e) variants from that run's stage (b+c) checkpoint, 500 test
#     questions (one / twice / relevant crop / irrelevant crop), three trainings sharing the two cores:
#     - relevant crop 3 in 7 and count 4 in 9: 91.4 / 89.4 / 90.6 (count 90 against 97) / 87.6
#     - the tower and projector trained too (`two_part` "all", the mix above): 91.4 / 89.6 / 90.2 (count 88) / 89.4
#     - both: 90.8 / 90.2 / 89.8 (count 88) / 87.8
#     - the mix above for 4800 steps instead of 2400 (the shipped weights; 105.0 min in all, stage (e) 52.9 min):
#       91.8% (families 85-98), blank 24.6, twice 90.8 (-1.0), relevant crop 91.8 (+0.0; count 92, identity 86,
#       attribute 90), irrelevant crop 88.8. Perfect text boards: one 0.92, same 0.91 (count 0.90), relevant 0.915
#       (count 0.76, attribute 0.975). The length of stage (e), not its mix or the tower, is what closed the gap.
#     - relevant crop 3 in 7 and count 4 in 9 for 4800 steps: 91.6 / 91.6 / 91.6 (count 93) / 88.6 (blank 23.6) --
#       also on the bar, also no crop margin; not shipped.
#   - qwen2_vl-16l's stage (e) with the same count- and identity-heavy mix (from its stage (b+c) checkpoint, 104.4 min
#     in all): 93.6%, blank 29.2, twice 92.2, relevant crop 93.6 (count 91, identity 94), irrelevant crop 88.4 -- no
#     margin gained on the crop part (the shipped weights: 94.0 / 93.0 / 94.0 / 87.4).
# - then (session of 2026-11-30, 16:36-19:36), can the pair fit issue 16's 60 min? Seconds/step with both organisms
#   training, one thread each (`make -j2 organisms`'s load, nothing else running): llava-16l (a) 0.54, (b+c) 0.09,
#   (e) 0.51; qwen2_vl-16l (a) 0.65, (b+c) 0.30, (e) 0.74. The shipped recipes are about 90 and 85 min at these rates.
#   A step does not get cheaper: 47% of it is matmuls at ~75 GFLOP/s, 20% attention (`python
#   scripts/organism_timing.py llava-16l 10 [--bf16 | --compile]`, machine idle): 0.51 s/step in fp32, 0.86 under CPU
#   bf16 autocast (avx512_bf16, no AMX), 0.47 with the decoder under torch.compile (a minute of warm-up); eager
#   attention instead of sdpa made no difference (0.52 against 0.54 in a one-off probe).
#   So the budget has to come from steps. Recipes sized to it (500 test questions; one / blank / twice / relevant crop /
#   irrelevant crop; a third training shared the cores from their 10th to 37th minute, so their logged times are 64.2
#   and 67.3 min, about 54 and 57 at the rates above):
#   - llava-16l: 3600 text steps (text-scene val 0.91, the 3600-step run above to the digit), 3000 vision steps,
#     2000 two-image steps at lr 6e-4: 84.6% (attribute 74), 20.8 / 86.0 / 87.8 / 82.4 -- the crop helps (+3.2) once
#     one image reads small objects badly, and the 90% bar is missed by 5.4 points.
#   - qwen2_vl-16l: 3000 text steps (0.925), 1000 vision steps, 1600 two-image steps at lr 6e-4: 88.8% (identity 80),
#     23.0 / 85.6 (-3.2) / 89.4 (+0.6) / 84.4.
#   - stage (e) alone at twice the lr for 2000 steps (llava-16l, from the shipped stage (b+c) checkpoint): 90.8%, 23.6 /
#     89.8 / 90.0 (-0.8) / 87.8 -- like 2400 steps at 3e-4 (-1.4), not like the 4800 that closed the crop gap.
# - then (sessions of 2026-11-30, 16:36-22:36), the other lever, width: 48 (3 heads, FFN 144), recipes as
#   shipped unless said, both trainings at once, one thread each (500 test questions; one / blank / twice / relevant
#   crop / irrelevant crop):
#   - qwen2_vl-16l: text-scene val plateau 0.945 (width 64: 0.97); 90.2% (identity 82), 30.8 / 88.8 / 90.4 (+0.2) /
#     85.2, 71.1 min logged (a test suite shared the cores in stage (e)), about 62 at `make -j2 organisms` rates. With
#     1800 two-image steps instead of 2400, from its stage (b+c) checkpoint (33.9 + 5.0 + 17.6 = 56.5 min): 90.0%
#     (families 82-96), 33.4 / 88.4 / 89.8 (-0.2) / 84.0 -- inside the budget, the crop part missed by 0.2 points.
#   - llava-16l: text-scene val 0.905 (identity 0.775; width 64: 0.93), image val 0.875 after stage (b+c); 87.8%
#     (attribute 78, identity 77), 21.2 / 86.8 / 88.8 (+1.0) / 86.6 in 66.9 min (27.8 + 8.9 + 30.2): over the budget
#     and under the 90% and 80%-per-family bars. Narrowing costs LLaVA's decoder the attribute and identity answers
#     before any image is seen, so no cut of its steps can recover them.
#   Two torch threads per training, the organisms one after the other (`make organisms` without -j2; the issue's
#   budget is one core each): stage (a) 0.342 against 0.526 s/step (llava-16l) and 0.433 against 0.626 (qwen2_vl-16l)
#   (`python scripts/organism_timing.py NAME 12 [--threads=2]`, machine idle). llava-16l's whole recipe on two threads
#   (nothing else running): 65.2 min (27.5 + 8.0 + 29.8; stage (e) at 0.37 s/step, 0.73 of one thread's under
#   `make -j2 organisms`). Its float reductions differ from the shipped run's, as on another machine: 90.0% (identity
#   79, attribute 86), blank 27.0, twice 90.2, relevant crop 91.2 (+1.2), irrelevant crop 88.4 -- 1.8 points under the
#   shipped 91.8, identity under the 80% family bar (shipped 85): the shipped weights' margin does not cover a retrain.
# Both deep organisms meet the whole bar, the relevant crop with no margin (91.8 and 94.0, equal to one image;
# tests/test_organisms.py asserts it), and are the default (organisms.DEFAULT_VARIANT). Neither meets it within the
# 60 min budget: the shipped recipes take 105.0 and 105.1 min on a loaded core (about 90 and 85 under
# `make -j2 organisms` alone), and the recipes sized to 60 min miss the 90% bar (84.6 and 88.8; at width 48, 87.8
# for llava-16l in 66.9 min, and qwen2_vl-16l 90.0 in 56.5 min with the relevant crop 0.2 under one image).
_TWO = {"two_steps": 400}
# stage (e) of qwen2_vl-16l: twice the steps, a higher lr, and the relevant crop drawn twice as often as each other kind
_TWO_16L = {"two_steps": 2400, "two_lr": 3e-4,
            "two_kinds": ("one", "same", "relevant", "relevant", "irrelevant", "random")}
ORGANISM_RECIPE = {
    "llava-8l": {},
    "qwen2_vl-8l": _QWEN_8L,
    "llava-32l": {**_TWO},
    "qwen2_vl-28l": {**_QWEN_8L, **_TWO},
    "llava-16l": {**_QWEN_8L, "vision_steps": 6000, "vision_zoom": 0.5, "vision_zoom_target": "first", **_TWO_16L,
                  "two_steps": 4800, "two_families": ("attribute", "identity", "identity", "existence", "count", "count",
                                                      "count", "spatial")},
    "qwen2_vl-16l": {**_QWEN_8L, **_TWO_16L},
}
# stage (f), issue 28's small details (world-fine), fine-tuned from the weights of stages (a)-(e); measured in
# organisms/weights/RECIPE_NOTES.md. Qwen2-VL's crop tokens target a magnified object on its first token only, as
# llava-16l's tower was taught in stage (b+c), so a crop's object stays one token (its stage (b+c) has no zoom share,
# so the setting changes nothing before stage (f))
_FINE = {"fine_steps": 600, "fine_batch": 16, "fine_lr": 3e-4}
ORGANISM_RECIPE["llava-16l"] = {**ORGANISM_RECIPE["llava-16l"], **_FINE}
ORGANISM_RECIPE["qwen2_vl-16l"] = {**ORGANISM_RECIPE["qwen2_vl-16l"], **_FINE, "vision_zoom_target": "first"}


def world_settings() -> dict:
    """The world's module settings a training run depends on (recorded in training_log.json and the model card)."""
    return {"spatial_anchor": world.SPATIAL_ANCHOR, "relations": list(world.RELATIONS), "grid": world.GRID,
            "fine_pixel_scale": world.FINE_PIXEL_SCALE, "fine_object_scale": world.FINE_OBJECT_SCALE}


def _image_token(name: str) -> str:
    return "<image>" if name == "llava" else "<|image_pad|>"


class Trainer(FineStage):
    def __init__(self, name: str, seed: int = 0, threads: int | None = 1, recipe: dict | None = None, **overrides):
        if threads:
            torch.set_num_threads(threads)
        name = resolve_name(name)
        self.name, self.arch, self.seed, self.threads = name, arch_of(name), seed, threads
        self.recipe = {**RECIPE, **ORGANISM_RECIPE[name], **(recipe or {})}
        self.model, self.processor = build(name, seed=seed, **overrides)
        if self.recipe.get("qk_init_std"):
            # without this the answer position's attention stays spread over ~60 tokens (35 of them empty cells) and
            # the decoder sits on the answer prior for thousands of steps
            g = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n.startswith("model.language_model") and n.endswith(("q_proj.weight", "k_proj.weight")):
                        p.copy_(torch.randn(p.shape, generator=g) * self.recipe["qk_init_std"])
        self.tok = self.processor.tokenizer
        self.scene_ids = torch.tensor(self.tok.convert_tokens_to_ids(list(world.SCENE_TOKENS)))
        self.scene_index = {t: i for i, t in enumerate(world.SCENE_TOKENS)}
        parts = []
        for t in world.SCENE_TOKENS:
            if t == world.EMPTY_TOKEN:
                parts.append([t, t, t])
            else:
                parts.append(t.strip("<>").split("_"))
        self.scene_parts = torch.tensor([self.tok.convert_tokens_to_ids(p) for p in parts])  # [41, 3]
        self.composed = False
        self.counter = 0  # index into the train split's sample stream
        self.gen = torch.Generator().manual_seed(seed)
        self.log: list[dict] = []
        self.timings: dict[str, float] = {}
        # mid-stage checkpoints (set by `train`): where, how often, and the one to resume from
        self.ckpt_file, self.ckpt_every, self.partial = None, 0, None
        self.base, self.base_log = None, []  # the weights stage (f) started from (`load_base`), and their log

    # ------------------------------------------------------------------ data
    def _samples(self, n: int, with_image: bool, progress: float = 1.0, families=None):
        fams = families or self.recipe.get("train_families") or self.recipe.get("families")
        for until, early in self.recipe.get("family_stages") or ():
            if progress < until:  # stage (a) family curriculum: the early part of the stage sees only these families
                fams = early
                break
        self._families_now = fams
        out = [world.make_sample("train", self.counter + i, seed=self.seed, families=fams, with_image=with_image)
               for i in range(n)]
        self.counter += n
        return out

    def _texts(self, samples, with_answer=True):
        eos = self.tok.eos_token
        sep = " " if self.arch == "llava" else ""
        texts = []
        for s in samples:
            p = render_prompt(self.processor, user_text(s.question))
            texts.append(p + sep + s.answers[0] + eos if with_answer else p)
        return texts

    def _curriculum_samples(self, samples, progress):
        """Stage (a) curriculum: early on, keep only a random subset of k objects of each scene (k grows from 1 to the
        full scene over the first `curriculum` fraction of the stage) and ask a question that is well posed for the
        reduced scene (family-balanced, from world.scene_questions)."""
        frac = float(self.recipe.get("curriculum") or 0)
        if frac <= 0 or progress >= frac:
            return samples
        import copy

        rng = np.random.default_rng([self.seed, 11, self.counter])
        out = []
        for s in samples:
            objs = s.meta["objects"]
            k = max(1, int(round(1 + (progress / frac) * (len(objs) - 1) * rng.uniform(0.5, 1.0))))
            keep = [objs[j] for j in sorted(rng.choice(len(objs), size=min(k, len(objs)), replace=False))]
            qs = world.scene_questions(keep)
            if not qs:
                out.append(s)
                continue
            fams = sorted({f for f, _, _ in qs})
            fam = fams[int(rng.integers(len(fams)))]
            opts = [q for q in qs if q[0] == fam]
            f, q, a = opts[int(rng.integers(len(opts)))]
            t = copy.copy(s)
            t.question, t.answers, t.family = q, [a], f
            t.meta = {**s.meta, "objects": keep, "scene_cells": world.scene_cells(keep)}
            out.append(t)
        return out

    def _texts_packed(self, samples):
        """Multi-turn conversations: turn 1 is exactly the evaluation prompt + answer, then pack-1 more questions
        about the same scene (family-balanced, from world.scene_questions), each answered + EOS."""
        K = int(self.recipe.get("pack") or 1)
        if K <= 1:
            return self._texts(samples)
        eos = self.tok.eos_token
        rng = np.random.default_rng([self.seed, 7, self.counter])
        texts = []
        for s, first in zip(samples, self._texts(samples)):
            pool = [q for q in world.scene_questions(s.meta["objects"]) if q[1] != s.question]
            fams = sorted({f for f, _, _ in pool})
            turns = []
            for _ in range(K - 1):
                if not pool:
                    break
                fam = fams[int(rng.integers(len(fams)))]
                opts = [q for q in pool if q[0] == fam] or pool
                q = opts[int(rng.integers(len(opts)))]
                pool.remove(q)
                fams = sorted({f for f, _, _ in pool})
                ut = user_text(q[1], None if self.recipe.get("pack_short") else POST_PROMPT)
                if self.arch == "llava":
                    turns.append(f"USER: {ut} ASSISTANT: {q[2]}{eos}")
                else:
                    turns.append(f"\n<|im_start|>user\n{ut}<|im_end|>\n<|im_start|>assistant\n{q[2]}{eos}")
            texts.append(first + "".join(turns))
        return texts

    def _block_questions(self, samples):
        """For each scene, `blocks` (question, answer) pairs: the sample's own, then blocks-1 more about the same
        scene from world.scene_questions, their families drawn with the training family weights."""
        K = int(self.recipe.get("blocks") or 1)
        weights = list(getattr(self, "_families_now", None) or world.FAMILIES)
        rng = np.random.default_rng([self.seed, 13, self.counter])
        out = []
        for s in samples:
            qa = [(s.question, s.answers[0])]
            pool = [q for q in world.scene_questions(s.meta["objects"]) if q[1] != s.question]
            while len(qa) < K and pool:
                fams = [f for f in weights if any(q[0] == f for q in pool)]
                if not fams:
                    break
                fam = fams[int(rng.integers(len(fams)))]
                opts = [q for q in pool if q[0] == fam]
                q = opts[int(rng.integers(len(opts)))]
                pool.remove(q)
                qa.append((q[1], q[2]))
            out.append(qa)
        return out

    def _encode_blocks(self, samples):
        """Several questions about one scene in ONE sequence that shares the scene prefix: each question block is
        exactly an evaluation prompt + answer + EOS, sees the prefix and itself only (4D mask), and takes the
        positions it would have right after the image (for Qwen2-VL the M-RoPE positions of the single prompt), so
        every block is trained as an independent sample while the image prefix is computed once."""
        it = _image_token(self.arch)
        img_id = self.tok.convert_tokens_to_ids(it)
        eos, sep = self.tok.eos_token, (" " if self.arch == "llava" else "")
        seqs, poss, blks = [], [], []
        for s, qa in zip(samples, self._block_questions(samples)):
            texts = [render_prompt(self.processor, user_text(q)).replace(it, it * N_IMAGE_TOKENS) + sep + a + eos
                     for q, a in qa]
            ids = [self.tok(t)["input_ids"] for t in texts]
            cut = max(i for i, t in enumerate(ids[0]) if t == img_id) + 1 + (self.arch == "qwen2_vl")
            seq, pos, blk = list(ids[0][:cut]), None, [-1] * cut
            for j, one in enumerate(ids):
                assert one[:cut] == seq[:cut], "the question blocks must share the scene prefix"
                t = torch.tensor([one])
                if self.arch == "qwen2_vl":
                    p, _ = self.model.model.get_rope_index(**self._with_mrope_inputs({"input_ids": t}))
                    p = p[:, 0]  # [3, L]
                else:
                    p = torch.arange(len(one))[None]  # [1, L]
                pos = p[:, :cut] if pos is None else pos
                pos = torch.cat([pos, p[:, cut:]], 1)
                seq += one[cut:]
                blk += [j] * (len(one) - cut)
            seqs.append(seq); poss.append(pos); blks.append(blk)
        L = max(len(x) for x in seqs)
        B = len(seqs)
        pad = self.tok.pad_token_id
        ids = torch.full((B, L), pad, dtype=torch.long)
        pos = torch.zeros((poss[0].shape[0], B, L), dtype=torch.long)
        blk = torch.full((B, L), -2, dtype=torch.long)
        for b in range(B):
            n = len(seqs[b])
            ids[b, :n] = torch.tensor(seqs[b]); pos[:, b, :n] = poss[b]; blk[b, :n] = torch.tensor(blks[b])
        q, k = blk[:, :, None], blk[:, None, :]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        allowed = causal & (k != -2) & ((k == -1) | (k == q))
        allowed |= torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves (no all-masked softmax rows)
        mask = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        enc = {"input_ids": ids, "attention_mask": mask, "position_ids": pos if self.arch == "qwen2_vl" else pos[0]}
        return self._with_mrope_inputs(enc)

    def _with_mrope_inputs(self, enc):
        """Qwen2-VL's extra inputs for text with image placeholders: mm_token_type_ids and one [1, 12, 12] grid per
        row (a 96 px world image always gives that grid). LLaVA: unchanged."""
        if self.arch == "qwen2_vl":
            ids = enc["input_ids"]
            enc["mm_token_type_ids"] = (ids == self.model.config.image_token_id).long()
            enc["image_grid_thw"] = torch.tensor([[1, 2 * world.GRID, 2 * world.GRID]] * ids.shape[0])
        return enc

    def _encode_text_only(self, texts):
        it = _image_token(self.arch)
        texts = [t.replace(it, it * N_IMAGE_TOKENS) for t in texts]
        return self._with_mrope_inputs(dict(self.tok(texts, padding=True, return_tensors="pt")))

    def _encode(self, samples, with_answer=True, images=None, packed=False):
        texts = self._texts_packed(samples) if packed else self._texts(samples, with_answer)
        imgs = images if images is not None else [s.image for s in samples]
        return dict(self.processor(images=imgs, text=texts, padding=True, return_tensors="pt"))

    def _labels(self, ids):
        """Answer word + EOS after every assistant cue (`assistant :` for LLaVA, `<|im_start|> assistant` for Qwen)."""
        if not hasattr(self, "_cue"):
            a = self.tok.convert_tokens_to_ids("assistant")
            self._cue = (a, self.tok.convert_tokens_to_ids(":")) if self.arch == "llava" else \
                (self.tok.convert_tokens_to_ids("<|im_start|>"), a)
        c0, c1 = self._cue
        hit = torch.zeros_like(ids, dtype=torch.bool)
        hit[:, 2:] = (ids[:, :-2] == c0) & (ids[:, 1:-1] == c1)
        labels = torch.full_like(ids, -100)
        labels[hit] = ids[hit]
        eos_pos = torch.zeros_like(hit)
        eos_pos[:, 1:] = hit[:, :-1]
        labels[eos_pos] = ids[eos_pos]
        return labels

    def cell_targets(self, samples):
        return torch.tensor([[self.scene_index[t] for t in s.meta["scene_cells"]] for s in samples])

    # ------------------------------------------------------------------ model pieces
    @property
    def embed(self):
        return self.model.get_input_embeddings()

    def _scene_embeds(self, targets):
        """Text-scene embeddings for cell targets [B, 36] (indices into SCENE_TOKENS)."""
        if not self.recipe.get("compose_scene") or self.composed:
            return self.embed(self.scene_ids[targets])
        W = self.embed.weight
        comp = W[self.scene_parts]  # [41, 3, D]
        comp = torch.where((self.scene_parts[:, :1] == self.scene_parts[:, 1:2]).unsqueeze(-1),
                           comp[:, 0:1].expand_as(comp) / 3, comp)  # <empty>: its own row (3 x 1/3)
        return comp.sum(1)[targets]

    def freeze_composition(self):
        """Write the composed scene embeddings into the scene tokens' rows (end of stage a)."""
        if self.recipe.get("compose_scene") and not self.composed:
            with torch.no_grad():
                rows = self._scene_embeds(torch.arange(len(world.SCENE_TOKENS)))
                self.embed.weight[self.scene_ids] = rows
        self.composed = True

    def _image_features(self, enc):
        return torch.stack(self.image_tokens(enc))  # [B, 36, D]: world images, 36 tokens each

    def _lm_forward(self, enc, feats):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kw = {k: v for k, v in enc.items()
              if k in ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "image_grid_thw")}
        mm = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}
        return self.model(**kw, mm_encoder_outputs=mm).logits

    def _answer_loss(self, logits, ids):
        labels = self._labels(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)

    def _align_loss(self, feats, targets):
        """Image tokens -> their cells' scene-token embeddings: squared error relative to the embedding scale (the
        decoder must receive the inputs it was trained on, not merely the nearest ones: a cross-entropy over -d^2
        alone is met by features 12x longer than the embeddings, which the decoder cannot read), plus a small
        cross-entropy over scale-free -d^2 that separates the 41 classes."""
        E = self.embed.weight[self.scene_ids]  # [41, D]
        scale = E.pow(2).sum(-1).mean().detach()
        d2 = (feats.unsqueeze(-2) - E).pow(2).sum(-1) / scale  # [B, 36, 41]
        ce = F.cross_entropy(-d2.reshape(-1, d2.shape[-1]), targets.reshape(-1))
        nmse = d2.gather(-1, targets.unsqueeze(-1)).mean()
        acc = (d2.argmin(-1) == targets).float().mean().item()
        return nmse + self.recipe.get("align_ce", 0.1) * ce, acc

    def _opt(self, params, lr, steps):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        steps = max(1, steps)  # a stage of 0 steps (e.g. joint_steps 0) builds its schedule and runs no step
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        return opt, sched

    def _set_trainable(self, part: str):
        for n, p in self.model.named_parameters():
            is_lm = n.startswith("model.language_model") or n.startswith("lm_head")
            p.requires_grad = {"lm": is_lm, "vision": not is_lm, "all": True}[part]
        return [p for p in self.model.parameters() if p.requires_grad]

    def _begin(self, part: str, lr: float, steps: int, desc: str, stage: str | None = None):
        """One stage's set-up: which parameters train, AdamW + warmup/cosine, train mode, a tqdm bar, the start time.
        A mid-stage checkpoint of this stage (`self.partial`, see `train`) restores the optimiser and schedule and
        starts the bar at its step; the start time is moved back by the minutes the stage had already run."""
        params = self._set_trainable(part)
        opt, sched = self._opt(params, lr, steps)
        self.model.train()
        start, elapsed = 0, 0.0
        if stage and self.partial and self.partial["stage"] == stage:
            opt.load_state_dict(self.partial["opt"])
            sched.load_state_dict(self.partial["sched"])
            start, elapsed = int(self.partial["step"]), float(self.partial["elapsed"])
            self.partial = None
        self._running = (stage, opt, sched, time.time() - elapsed)
        bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"{self.name} {desc}", mininterval=5)
        return params, opt, sched, bar, time.time() - elapsed

    def _step_done(self, step: int):
        """Every `ckpt_every` steps, write a mid-stage checkpoint (model, optimiser, schedule, data position, noise
        generator, log) to `ckpt_file`, so a killed run resumes where it was instead of at the stage's start. Written
        to a temporary file and renamed, so a kill during the write leaves the previous checkpoint intact."""
        if not self.ckpt_file or not self.ckpt_every or (step + 1) % self.ckpt_every:
            return
        stage, opt, sched, t0 = self._running
        f = Path(self.ckpt_file)
        tmp = f.with_suffix(".tmp")
        torch.save({**self.state(), "stage": stage, "step": step + 1, "elapsed": time.time() - t0,
                    "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp)
        tmp.replace(f)

    def state(self) -> dict:
        """What a checkpoint holds besides the optimiser: weights, data position, noise generator, log, timings."""
        return {"model": self.model.state_dict(), "counter": self.counter, "composed": self.composed, "log": self.log,
                "timings": self.timings, "gen": self.gen.get_state()}

    def load_state(self, st: dict):
        self.model.load_state_dict(st["model"])
        self.counter, self.composed, self.log, self.timings = st["counter"], st["composed"], st["log"], st["timings"]
        self.gen.set_state(st["gen"])

    @staticmethod
    def _update(loss, params, opt, sched):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step()

    # ------------------------------------------------------------------ stages
    def stage_text(self, steps=None, lr=None):
        R = self.recipe
        steps = R["text_steps"] if steps is None else steps
        params, opt, sched, bar, t0 = self._begin("lm", lr or R["text_lr"], steps, "(a) text scenes", "text")
        step = bar.n - 1  # a resumed stage whose checkpoint was its last step runs no step
        for step in bar:
            samples = self._curriculum_samples(self._samples(R["batch"], with_image=False, progress=step / steps),
                                               step / steps)
            if R.get("text_two"):
                enc, feats = self._two_board_batch(samples)
            else:
                enc = self._encode_blocks(samples) if (R.get("blocks") or 1) > 1 else \
                    self._encode_text_only(self._texts_packed(samples))
                feats = self._scene_embeds(self.cell_targets(samples))
            if R["scene_noise"]:
                feats = feats + R["scene_noise"] * feats.detach().pow(2).mean().sqrt() * torch.randn(
                    feats.shape, generator=self.gen)
            logits = self._lm_forward(enc, feats)
            loss = self._answer_loss(logits, enc["input_ids"])
            self._update(loss, params, opt, sched)
            self._record("text", step, loss=loss.item(), bar=bar)
            if R.get("text_max_minutes") and time.time() - t0 > 60 * R["text_max_minutes"]:
                tqdm.write(f"[{self.name}] stage (a) stopped by the {R['text_max_minutes']} min guard at step {step + 1}")
                break
            every = R.get("text_check_every")
            if every and (step + 1) % every == 0 and step + 1 < steps:
                acc = self.quick_accuracy(200, "text")
                self.log.append({"stage": "text_check", "step": step, **acc})
                tqdm.write(f"[{self.name}] step {step + 1} ({(time.time() - t0) / 60:.1f} min): text-scene val "
                           f"accuracy {acc}")
                fam = min(v for k, v in acc.items() if k != "overall")
                if acc["overall"] >= R["text_target"] and fam >= R["text_family_target"]:
                    break
            self._step_done(step)
        self.freeze_composition()
        self.timings["text"] = time.time() - t0
        self.timings["text_steps_run"] = step + 1
        return self

    def second_board(self, sample, kind: str, rng) -> torch.Tensor:
        """The scene-token index of each token of a second image of `kind` (`second_images.KINDS` but 'one'), as the
        tower should read it: the board itself ('same'), or a crop's cells magnified as the processor shows them
        (`zoom_targets`) for 'relevant' / 'irrelevant' / 'random'."""
        from ..data.second_images import irrelevant_cells, random_cells, relevant_cells

        if kind == "same":
            return self.cell_targets([sample])[0]
        box = {"relevant": lambda: relevant_cells(sample), "irrelevant": lambda: irrelevant_cells(sample, rng),
               "random": lambda: random_cells(rng)}[kind]()
        return self.zoom_targets([sample], [box], None, 0)[0]

    def _two_board_batch(self, samples):
        """Stage (a) with a `text_two` share of two-board prompts: the scene as text, then a second board of a kind
        drawn from `two_kinds` (seeded by the data position), answer unchanged. The decoder learns to answer from the
        first image while its counting and lookup circuits form, instead of unlearning the second image in stage (e)
        (LLaVA only: a magnified crop fills the same 6 x 6 tokens as the image, so every row keeps 36 per image)."""
        if self.arch != "llava":
            raise ValueError("recipe text_two > 0 is for LLaVA organisms (a Qwen2-VL crop has its own token grid); "
                             "set text_two to 0 for this organism.")
        rng = np.random.default_rng([self.seed, 23, self.counter])
        kinds = [k for k in self.recipe["two_kinds"] if k != "one"]

        def second_of(_):
            return kinds[int(rng.integers(len(kinds)))] if rng.random() < self.recipe["text_two"] else None
        return self.board_prompts(samples, second_of, rng, with_answer=True)

    def board_prompts(self, samples, second_of, rng, with_answer: bool):
        """Text-board prompts: each sample's board, then a second board of kind `second_of(sample)` when that is not
        None (`second_board`, drawing from `rng`; LLaVA only); returns the encoded prompts and their scene embeddings.
        `second_of` is called once per sample, in order, before that sample's second board, so a caller's rng draws
        keep their order. ``second_of=lambda s: None`` gives the one-board prompts of stage (a)."""
        sep = " " if self.arch == "llava" else ""
        boards, texts = [], []
        for s in samples:
            boards.append(self.cell_targets([s])[0])
            kind = second_of(s)
            if kind:
                boards.append(self.second_board(s, kind, rng))
            p = render_prompt(self.processor, user_text(s.question), n_images=1 + bool(kind))
            texts.append(p + sep + s.answers[0] + self.tok.eos_token if with_answer else p)
        return self._encode_text_only(texts), self._scene_embeds(torch.stack(boards))

    def _blank_batch(self, n):
        imgs = []
        for _ in range(n):
            g = int(torch.randint(60, 200, (1,), generator=self.gen))
            imgs.append(world.blank_image((g, g, g)))
        return imgs

    def _zoom_crops(self, samples):
        """Stage (b+c)'s zoom share: each sample's image cropped to its relevant cells (padded by one cell) or to a
        random box of 2-5 cells a side, half and half (seeded by the data position), with the cell box of each crop."""
        from ..data.second_images import cells_to_px, random_cells, relevant_cells

        rng = np.random.default_rng([self.seed, 19, self.counter])
        boxes = [relevant_cells(s) if rng.random() < 0.5 else random_cells(rng) for s in samples]
        return [s.image.convert("RGB").crop(cells_to_px(*b)) for s, b in zip(samples, boxes)], boxes

    def zoom_targets(self, samples, boxes, ip, first: int):
        """The scene-token index each token of each crop shows (`second_images.zoomed_cells` over the part of the crop
        the processor keeps), one flat tensor per crop; `first` is the crops' index in the processor batch `ip`, which
        gives Qwen2-VL's token grids (LLaVA's crops are all 6 x 6: `ip` may be None)."""
        from ..adapters import processed_extent
        from ..data.second_images import first_token_of_each_cell, zoomed_cells

        one = self._part("vision_zoom_target", "every", ("every", "first")) == "first"
        out = []
        for k, (s, box) in enumerate(zip(samples, boxes)):
            r0, c0, r1, c1 = box
            if self.arch == "llava":  # CLIP: shortest edge to 96 px, then the centre square
                grid = (world.GRID, world.GRID)
                left, top, right, bottom = processed_extent(self.processor.image_processor, world.CELL * (c1 - c0),
                                                            world.CELL * (r1 - r0))
                shown = (r0 + top * (r1 - r0), c0 + left * (c1 - c0), r0 + bottom * (r1 - r0), c0 + right * (c1 - c0))
            else:  # Qwen2-VL: the whole crop, on its own merged token grid
                grid, shown = tuple((ip["image_grid_thw"][first + k, 1:] // 2).tolist()), box
            rows, cols = zoomed_cells(shown, grid)
            cells = self.cell_targets([s])[0].view(world.GRID, world.GRID)
            t = cells[torch.as_tensor(rows), torch.as_tensor(cols)]
            if one:  # "first": a magnified object on one token, `<empty>` on the others it covers
                t = torch.where(torch.as_tensor(first_token_of_each_cell(rows, cols)), t, torch.zeros_like(t))
            out.append(t.reshape(-1))
        return out

    def image_tokens(self, ip) -> list:
        """Each image's tokens after the projector / merger, [n_i, D] (crops of other shapes have other n_i)."""
        m = self.model.model
        if self.arch == "llava":
            out = m.get_image_features(pixel_values=ip["pixel_values"], vision_feature_layer=-1,
                                       vision_feature_select_strategy="default")
        else:
            out = m.get_image_features(ip["pixel_values"], ip["image_grid_thw"])
        return list(out.pooler_output)

    def stage_vision(self, steps=None, lr=None):
        R = self.recipe
        steps = R["vision_steps"] if steps is None else steps
        params, opt, sched, bar, t0 = self._begin("vision", lr or R["vision_lr"], steps, "(b+c) vision->scene tokens",
                                                    "vision")
        B = R.get("vision_batch") or R["batch"]
        n_blank = int(round(R["blank_frac"] * B))
        n_zoom = int(round(R.get("vision_zoom", 0) * B))
        for step in bar:
            samples = self._samples(B - n_blank - n_zoom, with_image=True)
            imgs = [s.image for s in samples] + self._blank_batch(n_blank)
            targets = list(torch.cat([self.cell_targets(samples),
                                      torch.zeros(n_blank, N_IMAGE_TOKENS, dtype=torch.long)]))
            zsamples = self._samples(n_zoom, with_image=True) if n_zoom else []
            crops, boxes = self._zoom_crops(zsamples) if n_zoom else ([], [])
            ip = dict(self.processor.image_processor(images=imgs + crops, return_tensors="pt"))
            targets += self.zoom_targets(zsamples, boxes, ip, len(imgs))
            feats = torch.cat(self.image_tokens(ip))
            loss, acc = self._align_loss(feats, torch.cat(targets).detach())
            self._update(loss, params, opt, sched)
            self._record("vision", step, loss=loss.item(), cell_acc=acc, bar=bar)
            self._step_done(step)
        self.timings["vision"] = time.time() - t0
        return self

    def _part(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        """A recipe entry ``key`` (what a stage trains, or how it targets), checked against its allowed values."""
        part = self.recipe.get(key, default)
        if part not in allowed:
            raise ValueError(f"recipe {key}={part!r}: use {' or '.join(repr(a) for a in allowed)}.")
        return part

    def stage_joint(self, steps=None, lr=None):
        R = self.recipe
        steps = R["joint_steps"] if steps is None else steps
        part = self._part("joint_part", "all", ("all", "vision"))
        params, opt, sched, bar, t0 = self._begin(part, lr or R["joint_lr"], steps, "(d) joint VQA", "joint")
        for step in bar:
            samples = self._samples(R.get("joint_batch") or R["batch"], with_image=True)
            if (R.get("blocks") or 1) > 1:
                enc = self._encode_blocks(samples)
                feats = self._image_features(dict(self.processor.image_processor(
                    images=[s.image for s in samples], return_tensors="pt")))
            else:
                enc = self._encode(samples, packed=True)
                feats = self._image_features(enc)
            logits = self._lm_forward(enc, feats)
            vqa = self._answer_loss(logits, enc["input_ids"])
            aux, acc = self._align_loss(feats, self.cell_targets(samples))
            loss = vqa + R["joint_aux"] * aux
            self._update(loss, params, opt, sched)
            self._record("joint", step, loss=vqa.item(), cell_acc=acc, bar=bar)
            self._step_done(step)
        self.timings["joint"] = time.time() - t0
        return self

    def _two_image_batch(self, samples):
        """Stage (e)'s prompts: each sample gets a second-image kind drawn from the recipe's `two_kinds` (seeded by
        the data position, so the same seed gives the same batches) and its images ([original] or [original, second]);
        the answer is the sample's own whatever the second image shows."""
        from .two_images import images_for

        kinds = list(self.recipe["two_kinds"])
        rng = np.random.default_rng([self.seed, 17, self.counter])
        out = []
        for s in samples:
            kind = kinds[int(rng.integers(len(kinds)))]
            out.append((kind, images_for(s, kind, rng)))
        return out

    def encode_two(self, samples, images, with_answer=True):
        """Processor inputs for prompts with one image placeholder per image, as hub LLaVA / Qwen2-VL take them
        (`fusion_utils.adapters.prepare(images=[[original, crop], ...])` renders the same prompts)."""
        eos, sep = self.tok.eos_token, (" " if self.arch == "llava" else "")
        texts = []
        for s, ims in zip(samples, images):
            p = render_prompt(self.processor, user_text(s.question), n_images=len(ims))
            texts.append(p + sep + s.answers[0] + eos if with_answer else p)
        flat = [im for ims in images for im in ims]
        return dict(self.processor(images=flat, text=texts, padding=True, return_tensors="pt"))

    def stage_two(self, steps=None, lr=None):
        """(e) two images per prompt: [original], [original, original], [original, crop of the relevant cells],
        [original, crop elsewhere] or [original, random crop], answer unchanged, answer + EOS loss; trains
        `two_part` (the decoder by default: the vision tower already maps a cell to its scene token)."""
        R = self.recipe
        steps = R.get("two_steps", 0) if steps is None else steps
        part = self._part("two_part", "lm", ("lm", "all"))
        params, opt, sched, bar, t0 = self._begin(part, lr or R["two_lr"], steps, "(e) two images", "two")
        for step in bar:
            # `two_families` (default: the stage (a) mix) can weight the family the second image confuses most
            samples = self._samples(R.get("two_batch") or R["batch"], with_image=True, families=R.get("two_families"))
            kinds, images = zip(*self._two_image_batch(samples))
            enc = self.encode_two(samples, images)
            loss = self._answer_loss(self.model(**enc).logits, enc["input_ids"])
            self._update(loss, params, opt, sched)
            self._record("two", step, loss=loss.item(), bar=bar)
            self._step_done(step)
        self.timings["two"] = time.time() - t0
        return self

    def _record(self, stage, step, bar=None, **vals):
        self.log.append({"stage": stage, "step": step, **vals})
        if bar is not None and step % 10 == 0:
            recent = [r for r in self.log[-50:] if r["stage"] == stage]
            bar.set_postfix({k: f"{np.mean([r[k] for r in recent]):.3f}" for k in vals})

    # ------------------------------------------------------------------ eval / save
    @torch.no_grad()
    def quick_accuracy(self, n=200, mode="image", split="val", second: str | None = None):
        """First-token argmax accuracy on `split` (mode 'image' or 'text' scenes). `second` (text mode, LLaVA): a
        second text board of that kind after each scene (`second_board`), so the decoder's reading of two images is
        measured without the tower: `quick_accuracy(400, "text", second="same")`."""
        if second is not None and (mode != "text" or self.arch != "llava"):
            raise ValueError(f"second={second!r} is for mode='text' on a LLaVA organism; drop it for mode={mode!r}.")
        self.model.eval()
        ds = world.world_dataset(split, n, seed=self.seed, families=self.recipe.get("families"))
        rng = np.random.default_rng([self.seed, 29])
        correct = []
        for i in range(0, len(ds), 50):
            batch = list(ds[i:i + 50])
            if mode == "text":
                logits = self._lm_forward(*self.board_prompts(batch, lambda _: second, rng, with_answer=False))
            else:
                enc = self._encode(batch, with_answer=False)
                logits = self._lm_forward(enc, self._image_features(enc))
            pred = self.tok.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
            correct += [p == s.answers[0] for p, s in zip(pred, batch)]
        self.model.train()
        fams = {}
        for s, c in zip(ds, correct):
            fams.setdefault(s.family, []).append(c)
        return {"overall": float(np.mean(correct)), **{f: float(np.mean(v)) for f, v in fams.items()}}

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad = True
        self.model.save_pretrained(out, safe_serialization=True)
        self.processor.save_pretrained(out)
        (out / "training_log.json").write_text(json.dumps(
            {"seed": self.seed, "threads": self.threads, "recipe": self.recipe, "timings_s": self.timings,
             "world": world_settings(), **({"base": self.base} if self.base else {}),
             "samples_seen": self.counter, "log": self.base_log + self.log[::10]}, indent=1))
        return out


STAGES = ("text", "vision", "joint", "two", "fine")


def checkpoint_key(tr: Trainer, overrides: dict | None = None) -> str:
    """The stage checkpoints' key: the full recipe, the built model config and the world settings, so a changed
    recipe, model default (e.g. a rotary setting, which no weight shape reveals) or world never resumes a stale stage."""
    from ..runs import config_hash

    return config_hash({"recipe": tr.recipe, "overrides": overrides or {}, "threads": tr.threads,
                        "config": tr.model.config.to_json_string(use_diff=False), "world": world_settings()})[:10]


def load_base(tr: Trainer, base_dir) -> None:
    """Start `tr` where the weights in `base_dir` ended (stages (a)-(e) done): their parameters, data position,
    training log and timings, so stage (f) fine-tunes them as it would at the end of a full run."""
    base = Path(base_dir)
    log = json.loads((base / "training_log.json").read_text())
    trained = type(tr.model).from_pretrained(base, use_safetensors=True, dtype=torch.float32)
    try:
        tr.model.load_state_dict(trained.state_dict())
    except RuntimeError as e:
        raise ValueError(f"The weights in {base} are not a {tr.name} organism ({str(e).splitlines()[0]}); pass the "
                         f"directory of a {tr.name} training.") from None
    tr.counter, tr.composed = int(log["samples_seen"]), True
    tr.base_log, tr.timings = list(log.get("log", [])), dict(log.get("timings_s", {}))
    tr.base = {"dir": str(base), "samples_seen": tr.counter, "recipe_steps": {k: v for k, v in log["recipe"].items()
                                                                              if k.endswith("_steps")}}


def _run_stage(tr: Trainer, stage: str, ckpt: Path, resume: bool) -> None:
    """One stage, or its checkpoint when it exists; a mid-stage checkpoint of it resumes at its step."""
    fns = {"text": (tr.stage_text, "text"), "vision": (tr.stage_vision, "image"), "joint": (tr.stage_joint, "image"),
           "two": (tr.stage_two, "image"), "fine": (tr.stage_fine, "image")}
    fn, mode = fns[stage]
    f = ckpt / f"{stage}.pt"
    if resume and f.exists():
        tr.load_state(torch.load(f, weights_only=True))
        print(f"[{tr.name}] resumed after stage {stage} from {f}", flush=True)
        return
    part = ckpt / "partial.pt"
    if resume and part.exists():
        st = torch.load(part, weights_only=True)
        if st["stage"] == stage:
            tr.load_state(st)
            tr.partial = st
            print(f"[{tr.name}] resuming stage {stage} at step {st['step']} from {part}", flush=True)
    fn()
    if tr.recipe.get(f"{stage}_steps", 1):  # optional stages (e) and (f) print nothing when skipped
        print(f"[{tr.name}] after stage {stage}: {mode} val accuracy {tr.quick_accuracy(200, mode)}", flush=True)
    torch.save(tr.state(), f)


def train(name: str, out_dir=None, seed: int = 0, threads: int | None = 1, recipe: dict | None = None,
          evaluate_after: bool = True, ckpt_dir=None, resume: bool = True, stop_after: str | None = None,
          ckpt_every: int = 100, base_dir=None, **overrides):
    """Run the full staged recipe for organism `name` and save it to `out_dir` (default: the shipped weights dir).

    After each stage the trainer state is checkpointed in `ckpt_dir` (default: <tmp>/fusion_utils_organisms/<name>
    -seed<seed>-<key>), and every `ckpt_every` steps within a stage in `partial.pt` there; with `resume=True` finished
    stages are loaded instead of retrained and a partial stage continues from its last checkpoint (same batches, same
    schedule: a resumed run takes the steps an uninterrupted one would). `stop_after` (one of `STAGES`) ends the run
    after that stage's checkpoint, without saving weights. `base_dir`: weights that already went through stages
    (a)-(e) (`load_base`); only stage (f) runs.
    """
    import tempfile

    from . import weights_dir

    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r}: use one of {', '.join(STAGES)}.")
    out_dir = Path(out_dir) if out_dir else weights_dir(name)
    t0 = time.time()
    tr = Trainer(name, seed=seed, threads=threads, recipe=recipe, **overrides)
    key = checkpoint_key(tr, overrides)
    if base_dir is not None:
        load_base(tr, base_dir)
        key += "-base"
    ckpt = Path(ckpt_dir) if ckpt_dir else \
        Path(tempfile.gettempdir()) / "fusion_utils_organisms" / f"{tr.name}-seed{seed}-{key}"
    ckpt.mkdir(parents=True, exist_ok=True)
    tr.ckpt_file, tr.ckpt_every = ckpt / "partial.pt", ckpt_every
    for stage in STAGES[STAGES.index("fine"):] if base_dir is not None else STAGES:
        _run_stage(tr, stage, ckpt, resume)
        if stage == stop_after:
            print(f"[{tr.name}] stopped after stage {stage}; checkpoints in {ckpt}", flush=True)
            return tr
    tr.timings["total"] = sum(v for k, v in tr.timings.items() if k in STAGES)
    tr.timings["wall_this_run"] = time.time() - t0
    tr.save(out_dir)
    print(f"[{tr.name}] saved to {out_dir}; training time {tr.timings['total'] / 60:.1f} min", flush=True)
    if evaluate_after:
        try:
            from .evaluate import evaluate_and_card

            evaluate_and_card(tr.name, out_dir, trainer=tr)
        except Exception as e:  # keep the weights even if evaluation fails
            print(f"[{tr.name}] evaluation failed: {e!r}", flush=True)
    return tr
