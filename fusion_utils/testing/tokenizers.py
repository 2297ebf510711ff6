"""Tokenizers for the tiny models, trained offline and deterministically on a fixed word list (`tokenizers` BPE)."""
from __future__ import annotations

import json

# ---------------------------------------------------------------------------------------------------------------
_WORDS = """
a an the is are was were be been being am do does did has have had can could will would should may might must
what which who whom whose where when why how many much there here this that these those it its they them their
he she his her we our you your i me my of in on at by for with from to into onto over under above below behind
between near next left right top bottom front back middle center side up down out off inside outside and or not no
yes true false color colour red green blue yellow orange purple pink brown black white gray grey gold silver
one two three four five six seven eight nine ten zero number count several few some all both each every any
image picture photo photograph scene view shown see seen show look looks looking appear appears visible
man woman person people boy girl child children men women player players baby face hand hands head hair eye eyes
dog cat horse bird cow sheep elephant bear zebra giraffe animal animals fish car bus truck train plane airplane
boat bike bicycle motorcycle road street sign light traffic building house room kitchen table chair bed couch
sofa window door wall floor grass tree trees sky cloud clouds water sea beach snow mountain field park city
food pizza sandwich cake banana apple orange bowl plate cup glass bottle knife fork spoon phone computer laptop
screen keyboard book clock umbrella bag ball kite frisbee skateboard surfboard racket bat glove hat shirt tie
standing sitting walking running playing holding eating wearing riding flying lying parked open closed
big small large little tall short long old new young wooden metal plastic round square empty full
answer question using single word phrase write general description describe detail details briefly
chat between curious human artificial intelligence assistant gives helpful detailed polite answers user system
you You What How Is Are Which Where Who Why Question Answer USER ASSISTANT Human Assistant Picture Video
please tell about kind type made shape time day night weather sunny cloudy rainy indoor outdoor
"""
_TEXT_CORPUS = [line for line in _WORDS.split("\n") if line.strip()] + [
    "What is the color of the car?", "How many people are in the picture?", "Is there a dog in the image?",
    "Answer the question using a single word or phrase.", "Write a general description of the image.",
    "USER: ASSISTANT:", "###Human: ###Assistant:", "Question: Answer:", "0123456789 .,:;!?'\"()[]{}-_/#*+=<>@&%$",
]
_LLAMA_SPECIAL = ["<unk>", "<s>", "</s>"]
_LLAMA_BYTES = [f"<0x{i:02X}>" for i in range(256)]


def train_bpe(pre_tokenizer, special_tokens, vocab_size, initial_alphabet=()):
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=list(initial_alphabet), min_frequency=1)
    tok.train_from_iterator(_TEXT_CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def llama_tokenizer(extra_special: list[str], pad_token: str | None, named: dict | None = None):
    """A Llama/Vicuna-style tokenizer (Metaspace BPE with byte fallback, BOS prepended); LEFT padding. ``named``:
    special tokens the processor reads as attributes (``{"image_token": "<image_soft_token>"}``)."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import LlamaTokenizer

    vocab, merges = train_bpe(pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
                               _LLAMA_SPECIAL + _LLAMA_BYTES, vocab_size=640)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                         add_bos_token=True, add_eos_token=False, padding_side="left", legacy=False,
                         extra_special_tokens=named)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special], special_tokens=True)
    if pad_token is not None:
        tok.pad_token = pad_token
    tok.padding_side = "left"
    return tok


_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def qwen_tokenizer(extra_special: tuple[str, ...] = (), named: dict | None = None):
    """A Qwen2-style byte-level BPE with Qwen's special tokens (same relative order as the real one), then
    ``extra_special``; LEFT padding. ``named``: special tokens the processor reads as attributes."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), [], vocab_size=640,
                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", padding_side="left", errors="replace", extra_special_tokens=named)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIAL + list(extra_special)],
                   special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.padding_side = "left"
    return tok


def bert_tokenizer():
    """InstructBLIP's Q-Former tokenizer: an uncased BERT WordPiece tokenizer (plus the `[DEC]` BOS token)."""
    from transformers import BertTokenizer

    chars = sorted({c for line in _TEXT_CORPUS for c in line.lower() if not c.isspace()})
    words = sorted({w for line in _TEXT_CORPUS for w in line.lower().split() if w.isalpha()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars if c.isalnum()]
    tokens += [w for w in words if w not in set(tokens)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.truncation_side = "left"
    return tok


def round_vocab(n: int, multiple: int = 64) -> int:
    return ((n + multiple - 1) // multiple) * multiple
