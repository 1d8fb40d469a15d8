"""What the audit's findings mean and what to try: one small rule table, read by the
report and the CLI's text summary, so both give the same advice.

Each finding of summary.json (a flag, a note, a class's empty maps, a cluster
explained by the background) picks one rule; the rule's text names the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A flagged class is "mostly right" when at least this share of the rows whose map
# was measured in the box were predicted right: right answers from the wrong place.
MOSTLY_RIGHT = 0.5
# A class's empty maps get advice when they are at least this share of its rows with a
# box or mask; a few empty maps in a large class are ordinary.
EMPTY_SHARE = 0.1


@dataclass(frozen=True)
class Rule:
    finding: str
    meaning: str
    action: str


RULES: dict[str, Rule] = {
    "background": Rule(
        "attention mostly outside the object, predictions mostly right",
        "the model is right about {label} while looking away from it, at the background: "
        "it may have learned the background (or the context), not the {label}",
        "collect {label} images on other backgrounds, or crop or mask the backgrounds in "
        "training, and re-audit"),
    "missed": Rule(
        "attention mostly outside the object, predictions mostly wrong",
        "the model neither looks at the {label} nor recognises it",
        "check these rows' labels and boxes, add more varied {label} training images, "
        "and re-audit"),
    "context": Rule(
        "detections' evidence mostly outside their objects",
        "the detector finds {label} objects by what lies outside their boxes (a tag, a "
        "neighbour, the surroundings) more than by the {label} itself: it may miss a "
        "{label} without that context, or detect one wherever the context appears",
        "look at the worst {label} detections, find what their maps light up outside the "
        "box, vary or remove it around the {label} objects in training, and re-audit"),
    "uniform": Rule(
        "attention barely above a uniform map",
        "the {label} heatmaps spread almost evenly over the image: they do not locate "
        "the object, or the target layer is too coarse to say",
        "compare another method or target layer; if the maps stay spread, the model may "
        "rely on global cues (colour, lighting, texture): vary them in training, and "
        "re-audit"),
    "empty": Rule(
        "empty maps",
        "{count} {label} map(s) are empty: the model found no evidence for {label} "
        "anywhere in those images",
        "look at those images (see results.csv): what they share (background, lighting, "
        "pose, size) is probably missing from the {label} training images; add such "
        "images and re-audit"),
    # A detection audit's empty maps are of objects the detector found.
    "empty_detections": Rule(
        "empty maps",
        "{count} {label} detection map(s) are empty: the detector found these objects, "
        "yet their Grad-CAM sums below zero everywhere on the layer, so the maps do not "
        "say where it looked",
        "open those detections (see results.csv), explain them with a method that keeps "
        "each place's own gradient (--method hirescam) or at another --layer, and "
        "re-audit"),
    "cluster": Rule(
        "a cluster explained by the background",
        "{count} {label} images (cluster {cluster}) are explained by the background while "
        "the class's other images are not",
        "open the listed images, find what they share outside the object (background, "
        "watermark, border, tag), vary or mask it in training, and re-audit"),
    "not_judged": Rule(
        "attention not judged",
        "too few {label} rows have a box or mask (and a map that is not empty) to say "
        "where the model looks",
        "give boxes or masks (the bbox or mask column) to more {label} rows and re-audit"),
}


def advise(data: dict[str, Any]) -> list[dict[str, Any]]:
    """summary.json's ``advice``: per finding, the rule it picks and its text."""
    detection = data.get("form") == "detection"
    advice = [_advice("context" if detection and _flag_rule(flag) != "uniform"
                      else _flag_rule(flag), flag["class"]) for flag in data["flags"]]
    for label, figures in data["per_class"].items():
        empty = figures.get("empty_maps", 0)
        if empty and empty >= EMPTY_SHARE * figures["boxes"]:
            advice.append(_advice("empty", label, count=empty,
                                  text="empty_detections" if detection else ""))
    for note in data.get("notes", []):
        advice.append(_advice("not_judged", note["class"]))
    for label, entry in data.get("clusters", {}).get("per_class", {}).items():
        for cluster in entry.get("background", []):
            advice.append(_advice("cluster", label, cluster=cluster + 1,
                                  count=entry["clusters"][cluster]["count"]))
    return advice


def _flag_rule(flag: dict[str, Any]) -> str:
    if flag["reason"] != "attention mostly outside the object":
        return "uniform"
    accuracy = flag.get("accuracy_located")
    return "missed" if accuracy is not None and accuracy < MOSTLY_RIGHT else "background"


def _advice(rule: str, label: str, text: str = "", **values: Any) -> dict[str, Any]:
    """One piece of advice: ``rule`` names it in summary.json; ``text`` picks other
    words for it (the rule's own by default)."""
    found = RULES[text or rule]
    return {"class": label, "rule": rule, "finding": found.finding,
            "meaning": found.meaning.format(label=label, **values),
            "try": found.action.format(label=label, **values)}


def advice_lines(data: dict[str, Any]) -> list[str]:
    """The advice as text lines, for the CLI's summary."""
    return [f"advice: {item['class']}: {item['finding']}: {item['meaning']}. "
            f"Try: {item['try']}." for item in data.get("advice", [])]
