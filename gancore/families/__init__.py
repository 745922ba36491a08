"""Families the trainer drives (see base.py); each module registers itself in FAMILIES."""

from gancore.families import gan  # noqa: F401  (registration)
