"""A metric key has one owner (gancore/metrics/fidelity.py MetricKey): built, taken apart, mapped to its protocol."""

from __future__ import annotations

import pytest

from gancore.errors import MetricsError
from gancore.metrics import MetricKey, metric_key, protocol_key


@pytest.mark.parametrize("name, key", [
    ("fid_lenet_10k", MetricKey("fid", "lenet", 10_000)),
    ("kid_cifar_cnn_1k", MetricKey("kid", "cifar_cnn", 1000)),
    ("is_lenet_fashion_2500", MetricKey("is", "lenet_fashion", 2500)),
    ("fid_inception_10k_test", MetricKey("fid", "inception", 10_000, "test")),
    ("precision_lenet_500_train", MetricKey("precision", "lenet", 500, "train")),
    ("best_fid_lenet_5k", MetricKey("fid", "lenet", 5000, best=True)),
])
def test_name_and_parse_round_trip(name, key):
    assert MetricKey.parse(name) == key and key.name == name


def test_built_from_the_extractor_name_and_its_protocol_tag():
    assert MetricKey.of("fid", "lenet_mnist", 10_000).name == metric_key("fid", "lenet_mnist", 10_000) == "fid_lenet_10k"
    assert MetricKey.of("fid", "inception", 10_000, "test").name == "fid_inception_10k_test"
    assert MetricKey.parse("fid_lenet_10k").protocol_key == "gancore.protocol.lenet_10k"
    assert MetricKey.parse("fid_lenet_10k").as_best().name == "best_fid_lenet_10k"
    assert MetricKey.parse("best_fid_lenet_10k").protocol_key == "gancore.protocol.lenet_10k"
    assert MetricKey.parse("fid_inception_10k_test").protocol_key == "gancore.protocol.inception_10k_test"
    assert protocol_key({"extractor": "lenet_mnist", "generated": 10_000}) == "gancore.protocol.lenet_10k"
    assert protocol_key({"extractor": "inception", "generated": 50_000}, "test") == "gancore.protocol.inception_50k_test"


@pytest.mark.parametrize("name", ["Loss/D", "images_per_s", "fid", "fid_lenet", "auroc", "fid_lenet_10k_val"])
def test_other_names_are_not_keys(name):
    assert MetricKey.find(name) is None
    with pytest.raises(MetricsError, match="not a sample-quality metric name"):
        MetricKey.parse(name)
