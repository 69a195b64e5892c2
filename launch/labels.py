"""Augmentation labels shared by the grid and the aggregation (no jax import)."""
from __future__ import annotations


class GridError(ValueError):
    """A grid that cannot be expanded (bad axis value, duplicate runs)."""


def aug_label(copies: int | None) -> str:
    """``1 -> "1"``, ``None -> "fresh"``."""
    return "fresh" if copies is None else str(int(copies))


def parse_aug(level) -> int | None:
    """``"fresh"`` / ``None`` -> ``None``; ``4`` / ``"4"`` -> ``4``."""
    if level is None or level == "fresh":
        return None
    try:
        n = int(level)
    except (TypeError, ValueError):
        raise GridError(f"augmentation level must be a positive integer or 'fresh', got {level!r}") from None
    if n < 1 or str(n) != str(level).strip():
        raise GridError(f"augmentation level must be a positive integer or 'fresh', got {level!r}")
    return n


def aug_sort_key(label: str):
    """Order of augmentation labels: 1, 2, 4, ..., then fresh."""
    return (1, 0) if label == "fresh" else (0, int(label))
