"""Evaluation: the paper's metrics and benchmark runners (REFERENCE §7).

    category_scores(predictions, references)   SSim, SIoU (LVIS, PACO)
    caption_scores(predictions, references)    BLEU@4, METEOR, ROUGE-L, CIDEr (VG, HC-STVG)
    choice_scores(items) / score_item(...)     accuracy per question type (VideoRefer-Bench-Q)
    description_scores / clair / dlc_scores    LLM-judged benchmarks, judge = any prompt -> reply callable
    load_queries(benchmark, path)              released benchmark files and ShapesWorld → queries
    run_benchmark(model, benchmark, path, out=...)   batched, sharded, resumable run → scores + paper table
    load_model(name) / PixelReferModel         our (model, processor) as a runner's model callable
"""

from pixelrefer.evaluation.benchmarks import BENCHMARKS, Benchmark, Query, get_benchmark, load_queries
from pixelrefer.evaluation.captions import CaptionScores, caption_scores, java_available
from pixelrefer.evaluation.category import (
    CategoryScores,
    SentenceEmbedder,
    category_scores,
    exact_match,
    normalize_category,
    semantic_iou,
)
from pixelrefer.evaluation.choice import ChoiceScores, choice_scores, predicted_letter, reference_letter, score_item
from pixelrefer.evaluation.judge import Judge, clair, description_scores, dlc_scores, read_dlc_bench
from pixelrefer.evaluation.models import ModelFn, PixelReferModel, load_model, resolve_model_name
from pixelrefer.evaluation.runners import BenchmarkResult, benchmark_data, run_benchmark, shapesworld_test_split
from pixelrefer.evaluation.scoring import BenchmarkScores, read_results, score_file, score_records
from pixelrefer.evaluation.tables import SummaryTable, combine_tables, summary_table

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkResult",
    "BenchmarkScores",
    "CaptionScores",
    "CategoryScores",
    "ChoiceScores",
    "Judge",
    "ModelFn",
    "PixelReferModel",
    "Query",
    "SentenceEmbedder",
    "SummaryTable",
    "benchmark_data",
    "caption_scores",
    "category_scores",
    "choice_scores",
    "clair",
    "combine_tables",
    "description_scores",
    "dlc_scores",
    "exact_match",
    "get_benchmark",
    "java_available",
    "load_model",
    "load_queries",
    "normalize_category",
    "predicted_letter",
    "read_dlc_bench",
    "read_results",
    "reference_letter",
    "resolve_model_name",
    "run_benchmark",
    "score_file",
    "score_item",
    "score_records",
    "semantic_iou",
    "shapesworld_test_split",
    "summary_table",
]
