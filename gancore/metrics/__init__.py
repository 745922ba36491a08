"""Sample-quality metrics (FID, IS, KID, precision/recall through torch-fidelity), feature extractors, figures.

    evaluate(cfg, sample_uint8, device)        -> {"fid_lenet_10k": ..., "kid_lenet_10k": ..., ...}
    protocol(cfg, ema=...)                     -> how those numbers are measured (stored beside them)
    train_classifier("lenet_mnist")            -> a domain extractor in $GANCORE_CACHE/extractors/
    tsne_plot(...), class_accuracy(...)        -> PNG figures (+ per-class accuracies)

What each module owns:
    nets.py        the domain classifiers' architectures (LeNet, CifarNet): features(x) and head(f)
    classifier.py  which domain classifiers exist (DOMAIN, FOR_DATASET), their input preparation, training and files
    extractors.py  feature extractors as torch-fidelity sees them: the FID Inception, the domain classifiers
                   registered with torch-fidelity, the choice of one (eval.extractor) and its tag in metric names
    fidelity.py    metric names, features of generated batches, cached real statistics, the metric table, evaluate()
    figures.py     figures from extractor features: t-SNE of real vs generated, per-class accuracy of conditional G
"""

from gancore.metrics.classifier import DOMAIN, FOR_DATASET, extractor_path, train_classifier
from gancore.metrics.extractors import default_inception_path, resolve
from gancore.metrics.fidelity import (
    ALL_METRICS,
    EvaluationStopped,
    MetricKey,
    count_tag,
    degenerate,
    evaluate,
    frechet_distance,
    metric_key,
    protocol,
    protocol_key,
    protocol_tag,
    real_statistics,
    statistics,
)
from gancore.metrics.figures import class_accuracy, tsne_figure, tsne_plot

__all__ = [
    "ALL_METRICS", "DOMAIN", "EvaluationStopped", "FOR_DATASET", "MetricKey", "class_accuracy", "count_tag", "default_inception_path", "degenerate", "evaluate",
    "extractor_path", "frechet_distance", "metric_key", "protocol", "protocol_key", "protocol_tag",
    "real_statistics", "resolve", "statistics",
    "train_classifier", "tsne_figure", "tsne_plot",
]
