"""A small word-level tokenizer, built locally with `tokenizers` (no download).

Notable:
- The special tokens sit at fixed ids 0..N so presets can name them in the
  config without a tokenizer at hand (`SPECIAL_TOKENS`).
- `<objectK>` / `<regionK>` are single added tokens so answers can refer back
  to objects by name.
- Words are split on whitespace and punctuation; unknown words map to `<unk>`.
  Decoding joins words with spaces; `tidy_spacing` then closes up brackets
  ("( C )" → "(C)", as the data writes option letters) on top of the
  decoder's own clean-up before `.`, `,`, `?`, `!`.
  Real checkpoints bring their own (Qwen2.5) tokenizer through
  `PixelReferProcessor.from_pretrained(path)`; this one serves the tiny model
  and random-weight runs at the 2B/7B shapes.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Fixed ids: the order here is the id.
SPECIAL_TOKENS = (
    "<unk>",
    "<pad>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<video>",
    "<REGION>",
    "<|stream_start|>",
    "<|stream_end|>",
)
SPECIAL_IDS = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
MAX_NAMED_OBJECTS = 16
OBJECT_NAME_TOKENS = tuple(f"<object{i}>" for i in range(MAX_NAMED_OBJECTS)) + tuple(
    f"<region{i}>" for i in range(MAX_NAMED_OBJECTS)
)

_PUNCTUATION = list(".,:;?!()[]'\"-/+=%&*#<>")
_LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
_DIGITS = [str(d) for d in range(10)] + [str(d) for d in range(10, 101)]
_BASE_WORDS = """
system user assistant time frame frames video image picture photo scene region regions object objects
what which who where when why how is are was were be been being do does did can could would should will
the a an of in on at to from by with without and or not no yes this that these those it its there here
please describe briefly detail detailed using only one word phrase category answer option options letter
given choices directly question caption short long first second third last next before after then while
left right top bottom middle center centre above below under over near far between behind front inside
outside beside next around up down across toward towards away moving moves move moved still static stays
stops starts turns appears disappears enters leaves shape shapes color colour colors colours size sizes
small large big tiny huge medium little larger smaller bigger biggest smallest same different more less
most least many few count number how-many than as also both each every all some any other another part
parts has have had with whose its their his her made kind type look looks like similar
red green blue yellow orange purple pink brown black white gray grey cyan magenta dark light bright
circle circles square squares triangle triangles rectangle rectangles star stars ellipse ellipses
hexagon hexagons diamond diamonds cross crosses ring rings line lines dot dots disk disks disc discs blob blobs
head body tail handle wheel wheels window door roof arm leg top edge corner
zero one two three four five six seven eight nine ten
house wall flag pole cloth faster further higher lower nearest neither partly hidden seen place relative speed
happens keeps if them way
""".split()


def base_vocabulary() -> list[str]:
    """Words of the built-in vocabulary, in id order after the special tokens."""
    seen: dict[str, None] = {}
    for word in [*_BASE_WORDS, *_PUNCTUATION, *_LETTERS, *_DIGITS]:
        seen.setdefault(word, None)
        seen.setdefault(word.capitalize(), None)
    return [w for w in seen if w not in SPECIAL_IDS]


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer over `words` (default: `base_vocabulary()`)."""
    vocab = dict(SPECIAL_IDS)
    for word in [*OBJECT_NAME_TOKENS, *(words if words is not None else base_vocabulary())]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated"), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token=None,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[2:])})
    tokenizer.add_tokens(list(OBJECT_NAME_TOKENS))
    return tokenizer


def is_word_level(tokenizer) -> bool:
    """Whether `tokenizer` is this module's word-level tokenizer (its decode inserts spaces between words)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


def tidy_spacing(text: str) -> str:
    """Undo the word-level decoder's spaces inside brackets: "( C ) red" → "(C) red"."""
    return re.sub(r"\s+\)", ")", re.sub(r"\(\s+", "(", text))
