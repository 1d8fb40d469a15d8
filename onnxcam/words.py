"""Counts in messages: "1 image", "2 images", so that no message says "1 labels"."""

from __future__ import annotations

# The few nouns of onnxcam's messages whose plural is not the singular plus "s".
_IRREGULAR = {"class": "classes", "box": "boxes", "category": "categories"}


def plural(count: int | float, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, the noun agreeing: ``plural(1, "image")`` is "1 image",
    ``plural(2, "image")`` "2 images"; ``many`` names an irregular plural."""
    word = noun if count == 1 else many or _IRREGULAR.get(noun, noun + "s")
    return f"{count} {word}"
