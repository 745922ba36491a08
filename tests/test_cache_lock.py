"""The shared cache's costly entries are built once: a domain extractor that two processes need at the same time is
trained by one of them; the other waits on the lock and then finds the file."""

from __future__ import annotations

import threading

import helpers

from gancore.io import file_lock
from gancore.metrics import classifier


def _fake_trainer(monkeypatch) -> list[str]:
    """train_classifier replaced by one that writes a file at once; returns the list of names it was called for."""
    calls = []

    def fake_train(name, out=None, device="cpu", **_):
        calls.append(name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"weights")

    monkeypatch.setattr(classifier, "train_classifier", fake_train)
    return calls


def test_a_waiting_process_finds_the_extractor_instead_of_training_it_again(monkeypatch, tmp_path):
    monkeypatch.setenv("GANCORE_CACHE", str(tmp_path / "cache"))  # not the shared one, which holds the real file
    calls = _fake_trainer(monkeypatch)
    p = classifier.extractor_path("lenet_mnist")
    assert not p.exists()
    got = []
    with file_lock(p.with_name(f".{p.name}.lock")):  # "another process" is training it
        t = threading.Thread(target=lambda: got.append(classifier.ensure_classifier("lenet_mnist")), daemon=True)
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive(), "ensure_classifier did not wait for the lock"
        p.write_bytes(b"weights")  # the other process's result lands
    helpers.join(t, timeout=30, what="ensure_classifier once the lock is released")
    assert got == [p]
    assert calls == []  # found, not trained again


def test_a_missing_extractor_is_trained_once(monkeypatch, tmp_path):
    monkeypatch.setenv("GANCORE_CACHE", str(tmp_path / "cache"))
    calls = _fake_trainer(monkeypatch)
    assert classifier.ensure_classifier("lenet_mnist") == classifier.extractor_path("lenet_mnist")
    assert classifier.ensure_classifier("lenet_mnist") == classifier.extractor_path("lenet_mnist")
    assert calls == ["lenet_mnist"]
