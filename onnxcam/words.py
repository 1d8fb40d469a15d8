"""Words in messages: counts that agree with their nouns ("1 image", "2 images", never
"1 labels"), and strings a sender chose, quoted at a bounded length."""

from __future__ import annotations

# The few nouns of onnxcam's messages whose plural is not the singular plus "s".
_IRREGULAR = {"class": "classes", "box": "boxes", "category": "categories"}


def plural(count: int | float, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, the noun agreeing: ``plural(1, "image")`` is "1 image",
    ``plural(2, "image")`` "2 images"; ``many`` names an irregular plural."""
    word = noun if count == 1 else many or _IRREGULAR.get(noun, noun + "s")
    return f"{count} {word}"


# A string a sender chose (a method, a bundle hash, a label, a message version) is
# quoted in error messages, records, Celery's results and logs at most this long.
ECHO_CHARS = 200


def clipped(text: str, limit: int = ECHO_CHARS) -> str:
    """``text``, or, when longer than ``limit``, its two ends with the count of characters
    cut between them: ``"aaaa...[9999800 characters cut]...zzzz"``. The ends stay
    because either may tell what the string was (a path's file name is at its end)."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}...[{len(text) - 2 * keep} characters cut]...{text[-keep:]}"
