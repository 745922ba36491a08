"""Sample-quality metrics (FID, IS, KID, precision/recall through torch-fidelity), feature extractors, figures.

    evaluate(cfg, sample_uint8, device)        -> {"fid_lenet_10k": ..., "kid_lenet_10k": ..., ...}
    train_classifier("lenet_mnist")            -> a domain extractor in $GANCORE_CACHE/extractors/
    tsne_plot(...), class_accuracy(...)        -> PNG figures (+ per-class accuracies)

Modules: classifier (domain nets: training, files), extractors (torch-fidelity extractors, choice of one),
fidelity (features, cached real statistics, metrics), figures.
"""

from gancore.metrics.classifier import DOMAIN, FOR_DATASET, extractor_path, train_classifier
from gancore.metrics.extractors import default_inception_path, resolve
from gancore.metrics.fidelity import (
    ALL_METRICS,
    count_tag,
    evaluate,
    frechet_distance,
    metric_key,
    real_statistics,
    statistics,
)
from gancore.metrics.figures import class_accuracy, tsne_figure, tsne_plot

__all__ = [
    "ALL_METRICS", "DOMAIN", "FOR_DATASET", "class_accuracy", "count_tag", "default_inception_path", "evaluate",
    "extractor_path", "frechet_distance", "metric_key", "real_statistics", "resolve", "statistics",
    "train_classifier", "tsne_figure", "tsne_plot",
]
