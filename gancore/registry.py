"""Tiny name -> object registries that fail fast with the list of known names.

Owns: `Registry` and the four tables a config names an entry of: MODELS (model.arch), LOSSES (loss.name),
DATASETS (data.name), FAMILIES (family). Metrics have no registry: gancore/metrics/fidelity.py's METRIC_FNS.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from gancore.errors import RegistryError


class Registry:
    """A named table of builders: `@MODELS.register("dcgan")`, then `MODELS["dcgan"]`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def __getitem__(self, name: str) -> Any:
        _load_builtins()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}{hint}; known: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._items

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._items)


MODELS = Registry("model")
LOSSES = Registry("loss")
DATASETS = Registry("dataset")
FAMILIES = Registry("family")

_loaded = False


def _load_builtins() -> None:
    """Import the modules whose decorators fill the registries (once, lazily)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import gancore.data  # noqa: F401
    import gancore.families.diffusion  # noqa: F401  (diffusion, denoiser_report)
    import gancore.families.gan  # noqa: F401
    import gancore.families.ganomaly  # noqa: F401
    import gancore.families.vae  # noqa: F401
    import gancore.losses  # noqa: F401
    import gancore.models  # noqa: F401
