"""COCO caption metrics (VG, HC-STVG, Ref-L4; paper Tables 1 and 4) through pycocoevalcap.

Notable:
- Scores are pycocoevalcap's own scorers: BLEU@1–4 (corpus level, "closest"
  reference length), METEOR 1.5, ROUGE-L (β = 1.2) and CIDEr-D, computed on
  Stanford PTB-tokenised, lower-cased, punctuation-free text, as the
  release's `COCOEvalCap` run does. Values are fractions (the paper prints
  them ×100).
- Predictions are cut to their first 100 words before anything else, as the
  release does (its cut splits on single spaces; ours on any whitespace).
- Java runs the PTB tokenizer and METEOR. Without `java` on PATH, METEOR is
  reported as None with a note saying how to get it, and the text is
  tokenised by `simple_tokenize` (lower-case, PTB-like punctuation split,
  the same punctuation removed), so BLEU, ROUGE-L and CIDEr are still
  computed; `CaptionScores.tokenizer` says which tokenizer ran.
- SPICE needs Stanford CoreNLP models downloaded at first use, which an
  offline machine cannot do: it is always reported as unavailable (None,
  with a note), never attempted.
- CIDEr-D's document frequencies come from the evaluated references, so it
  is a corpus statistic: it needs several samples with differing references
  to mean anything (one sample always scores 0).
- pycocoevalcap prints progress from BLEU; it is called with verbose=0 so
  library code stays silent.
- METEOR's Java process takes seconds to start (it loads paraphrase
  tables), so one is kept per Python process and closed at exit.
"""

from __future__ import annotations

import atexit
import re
import shutil
from dataclasses import dataclass, field

MAX_WORDS = 100
# Tokens the PTB step removes (pycocoevalcap's PUNCTUATIONS, after tokenisation).
# Lower-cased bracket tokens are NOT in that list (it holds "-LRB-"), so PTB output keeps "-lrb-": ours too.
_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_TOKEN = re.compile(r"\.\.\.|--|can(?=not\b)|[a-z0-9]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b"
                    r"|[a-z0-9]+(?:[-./][a-z0-9]+)*|\S")
JAVA_HINT = "install a Java runtime (e.g. `apt-get install default-jre-headless`) and put `java` on PATH"


def truncate_words(text: str, max_words: int = MAX_WORDS) -> str:
    """The first `max_words` whitespace-separated words of `text`."""
    return " ".join(text.split()[:max_words])


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """A Java-free stand-in for pycocoevalcap's PTB step: lower-case, split punctuation off, drop it."""
    tokens = [_BRACKETS.get(t, t) for t in _TOKEN.findall(text.replace("\n", " ").lower())]
    return " ".join(t for t in tokens if t not in _DROPPED)


@dataclass
class CaptionScores:
    """Corpus-level caption metrics as fractions; None where a metric could not run (see `notes`).

    Attributes:
        bleu: BLEU@1..4.
        per_sample: per-caption values of each metric, in input order (BLEU@4, ROUGE-L, CIDEr, METEOR).
        tokenizer: "ptb" (Stanford PTBTokenizer, as the release) or "simple" (no Java).
    """

    bleu: list[float]
    meteor: float | None
    rouge_l: float
    cider: float
    spice: float | None
    count: int
    tokenizer: str
    notes: list[str] = field(default_factory=list)
    per_sample: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def bleu4(self) -> float:
        return self.bleu[3]

    def as_dict(self) -> dict[str, float | None]:
        return {"BLEU@1": self.bleu[0], "BLEU@2": self.bleu[1], "BLEU@3": self.bleu[2], "BLEU@4": self.bleu[3],
                "METEOR": self.meteor, "ROUGE-L": self.rouge_l, "CIDEr": self.cider, "SPICE": self.spice}


def _tokenize(captions: dict[str, list[str]], use_java: bool) -> dict[str, list[str]]:
    if not use_java:
        return {key: [simple_tokenize(c) for c in texts] for key, texts in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({key: [{"caption": c} for c in texts] for key, texts in captions.items()})


_METEOR = None  # one METEOR Java process per Python process: it takes 5-20 s to start (paraphrase tables)


def _meteor(references: dict[str, list[str]], candidates: dict[str, list[str]]) -> tuple[float, list[float]]:
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        _METEOR = Meteor()
        atexit.register(_close_meteor)
    return _METEOR.compute_score(references, candidates)


def _close_meteor() -> None:
    global _METEOR
    if _METEOR is not None:
        process, _METEOR = _METEOR.meteor_p, None
        process.stdin.close()
        process.kill()
        process.wait()


def caption_scores(predictions: list[str], references: list[str] | list[list[str]], *,
                   max_words: int = MAX_WORDS, meteor: bool = True, use_java: bool | None = None) -> CaptionScores:
    """BLEU@1–4, METEOR, ROUGE-L and CIDEr of predictions against one or more references each.

    Args:
        references: one reference string per prediction, or a list of them.
        max_words: predictions are cut to this many words first (the release uses 100).
        meteor: compute METEOR (needs Java).
        use_java: run the PTB tokenizer and METEOR in Java; default: when `java` is on PATH.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("caption metrics need at least one prediction")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("every prediction needs at least one reference caption")
    java = java_available() if use_java is None else use_java
    notes = ["SPICE: unavailable offline (it downloads Stanford CoreNLP models at first use); reported as None"]
    if not java:
        why = "Java not used (use_java=False)" if use_java is False else f"Java not found ({JAVA_HINT})"
        notes.append(f"{why}: METEOR not computed and text tokenised by simple_tokenize, not the Stanford PTB "
                     f"tokenizer")
    elif not meteor:
        notes.append("METEOR not computed (meteor=False)")
    keys = [str(i) for i in range(len(predictions))]
    candidates = {k: [truncate_words(p, max_words)] for k, p in zip(keys, predictions)}
    # One tokenizer call for references and candidates: the PTB tokenizer is a Java start-up each time.
    captions = {**{f"g{k}": r for k, r in zip(keys, refs)}, **{f"r{k}": c for k, c in candidates.items()}}
    try:
        tokens = _tokenize(captions, java)
    except OSError as exc:  # e.g. a read-only pycocoevalcap folder (the PTB wrapper writes its input there)
        java = False
        notes.append(f"Stanford PTB tokenizer failed ({exc}); text tokenised by simple_tokenize, METEOR skipped")
        tokens = _tokenize(captions, False)
    gts, res = {k: tokens[f"g{k}"] for k in keys}, {k: tokens[f"r{k}"] for k in keys}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    per_sample = {"BLEU@4": list(bleu_each[3]), "ROUGE-L": [float(v) for v in rouge_each],
                  "CIDEr": [float(v) for v in cider_each]}
    meteor_score = None
    if meteor and java:
        try:
            meteor_score, meteor_each = _meteor(gts, res)
            per_sample["METEOR"] = [float(v) for v in meteor_each]
        except (OSError, ValueError) as exc:  # Java present but the METEOR process failed
            _close_meteor()
            notes.append(f"METEOR failed ({type(exc).__name__}: {exc}); the other metrics are unaffected")
    return CaptionScores([float(b) for b in bleu], meteor_score, float(rouge), float(cider), None, len(keys),
                         "ptb" if java else "simple", notes, per_sample)
