"""How one config key is declared and checked: default, type and allowed values on one line (EDM's click options).

Owns: `key` / `infra` / `family_section` (the field helpers), `Range` and its common instances, and checking one
value against its declaration. A key is a dataclass field whose annotation is its type and whose metadata says what
else a value must satisfy:

    nz: int = key(100, AT_LEAST_1)                                # latent size
    batchnorm: str = key("both", choices=("both", "g", "d", "none"))
    arch: str = key("dcgan_mnist", registry=MODELS)              # a name MODELS knows (gancore/registry.py)
    extractor: str = infra("auto", choices=asked("gancore.metrics.extractors.NAMES"))  # names another module owns
    log_every: int = infra(50, AT_LEAST_1)                       # infrastructure: not a hyper-parameter

gancore/config.py applies `coerce` (the type), `check` (range, listed choices) and `check_owned` (a registry or
another module's names: imports the owner, so only for a value other than the default) to every key it reads;
nothing else keeps a table of allowed values. Imports nothing heavy: the family sections
(gancore/families/*_config.py) are declared with it without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import yaml

from gancore.errors import ConfigError, RegistryError


@dataclass(frozen=True)
class Range:
    """Allowed numbers of one key: lo / hi bounds, each inclusive unless open; `note` says what an edge value means."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            s = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            s = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            s = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return s + (f" ({self.note})" if self.note else "")


POSITIVE = Range(0, lo_open=True)  # > 0
NON_NEGATIVE = Range(0)  # >= 0
AT_LEAST_1 = Range(1)
PROBABILITY = Range(0, 1)  # [0, 1]
FRACTION = Range(0, 1, hi_open=True)  # [0, 1)


def at_least(lo: float, note: str) -> Range:
    """`>= lo`, with what the edge value means: at_least(0, "0 = off")."""
    return Range(lo, note=note)


def asked(path: str) -> Callable[[], tuple[Any, ...]]:
    """Choices another module owns, imported when first asked: asked("gancore.metrics.fidelity.ALL_METRICS")."""
    module, name = path.rsplit(".", 1)
    return lambda: tuple(getattr(importlib.import_module(module), name))


Choices = tuple[Any, ...] | Callable[[], tuple[Any, ...]]


def key(default: Any, within: Range | None = None, *, choices: Choices | None = None, registry: Any = None,
        infra: bool = False) -> Any:
    """A config field: its default and what a value must satisfy (a tuple value: each element).

    within: the allowed range of a number; choices: the allowed values, or `asked(...)` for names another module
    owns; registry: a gancore.registry Registry the value must name; infra: infrastructure (never changes the
    result: not an MLflow param, may differ on resume)."""
    meta = {"infra": infra, "range": within, "choices": choices, "registry": registry}
    return dataclasses.field(default=default, metadata={k: v for k, v in meta.items() if v not in (None, False)})


def infra(default: Any, within: Range | None = None, *, choices: Choices | None = None) -> Any:
    """A field that does not change the result (kept out of MLflow params and resume checks)."""
    return key(default, within, choices=choices, infra=True)


def family_section(default: Any, *families: str) -> Any:
    """A section only the named families read (gancore/families/): kept out of other families' MLflow params."""
    return dataclasses.field(default=default, metadata={"families": families})


@functools.cache
def declarations(root: type) -> dict[str, dataclasses.Field]:
    """Dotted key -> its field (default and metadata) for every leaf of the dataclass tree `root`."""
    out = {}
    for f in dataclasses.fields(root):
        tp = typing.get_type_hints(root)[f.name]
        out.update({f"{f.name}.{k}": v for k, v in declarations(tp).items()} if dataclasses.is_dataclass(tp)
                   else {f.name: f})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checking one value against its declaration


def coerce(value: Any, tp: Any, key: str, listed: Any = ()) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats; `listed`: the
    key's declared choices (a bare YAML no / yes is the string where it is one of them)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, listed)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "2e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        # YAML 1.1 reads a bare no / yes (also off, false, ...) as a bool: train.mixed_precision=no means "no"
        if isinstance(value, bool) and isinstance(listed, tuple) and ("yes" if value else "no") in listed:
            return "yes" if value else "no"
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp} for {key}")


def unknown(key: str, known: list[str]) -> ConfigError:
    """An unknown dotted key, with the closest known ones (or its section's keys, or the sections)."""
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    if close:
        hint = f"did you mean {', '.join(close)}?"
    else:
        section = key.split(".")[0]
        in_section = [k for k in known if k.startswith(section + ".")]
        sections = sorted({k.split(".")[0] for k in known if "." in k})
        hint = (f"keys of '{section}': {', '.join(in_section)}" if in_section
                else f"sections: {', '.join(sections)} (see gancore/config.py)")
    return ConfigError(f"unknown config key '{key}'; {hint}")


def yaml_scalar(v: Any) -> str:
    """A value as an override writes it: 1e-3 -> 0.001, (1, 2) -> [1, 2]."""
    text = yaml.safe_dump(list(v) if isinstance(v, tuple) else v, default_flow_style=True)
    return text.strip().removesuffix("...").strip()


def _leaves(v: Any) -> list[Any]:
    """The numbers/strings inside a (nested) tuple value, or the value itself."""
    return [x for item in v for x in _leaves(item)] if isinstance(v, tuple) else [v]


def _not_one_of(key: str, val: Any, x: Any, allowed: tuple[Any, ...]) -> ConfigError:
    where = f"{key}={yaml_scalar(val)}" if isinstance(val, tuple) else key
    return ConfigError(f"{where}: {x!r} is not one of {', '.join(map(str, allowed))}")


def check(key: str, meta: Mapping[str, Any], val: Any) -> Any:
    """`val` (already of the annotated type) against the range and listed choices in its field's metadata; a
    tuple's every element is checked. Names another module owns are left to check_owned."""
    listed, rng = meta.get("choices"), meta.get("range")
    for x in _leaves(val):
        if isinstance(listed, tuple) and x not in listed:
            raise _not_one_of(key, val, x, listed)
        if rng is not None and x not in rng:
            each = "each value " if isinstance(val, tuple) else ""
            raise ConfigError(f"{key}={yaml_scalar(val)} is out of range: {each}must be {rng.describe()}")
    return val


def owned(meta: Mapping[str, Any]) -> bool:
    """Whether the allowed values live with another module (a registry, or `asked(...)` choices)."""
    return "registry" in meta or callable(meta.get("choices"))


def check_owned(key: str, meta: Mapping[str, Any], val: Any) -> None:
    """`val` against the registry or the other module's names in its field's metadata (importing the owner)."""
    if "registry" in meta:
        try:
            meta["registry"][val]
        except RegistryError as e:
            raise ConfigError(f"{key}: {e}") from None
        return
    allowed = meta["choices"]()
    for x in _leaves(val):
        if x not in allowed:
            raise _not_one_of(key, val, x, allowed)
