"""Long articles: split into sentences, classify each, and combine the sentence labels with
confidence weighting, instead of one score for a truncated 512-token window."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.sentiment import LABELS, Classifier, Prediction

# A sentence ends at . ! ? (optionally closed by a quote or bracket) followed by space and an
# upper-case letter, digit, quote or $; common abbreviations and single-letter initials (U.S.,
# J.P.) do not end one. The guards look behind the position just after the full stop, so each
# names the abbreviation with its full stop.
_ABBREVIATION_WORDS = ("Inc", "Corp", "Co", "Cos", "Ltd", "Plc", "Bros", "Mr", "Mrs", "Ms",
                       "Dr", "Prof", "Sr", "Jr", "St", "vs", "No", "Nos", "Fig", "approx",
                       "e.g", "i.e", "Jan", "Feb", "Aug", "Sept", "Sep", "Oct", "Nov", "Dec")
_ABBREVIATIONS = "".join(rf"(?<!\b{re.escape(word)}\.)" for word in _ABBREVIATION_WORDS) \
    + r"(?<!\b[A-Z]\.)"
_BOUNDARY = re.compile(_ABBREVIATIONS + r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'$(“])")
MAX_SENTENCES = 40
# A longer "sentence" (a transcript or a release without full stops) is cut into pieces of
# (about) equal length, at most this many words each, so that the classifier reads all of it
# instead of only its first max_length tokens.
MAX_WORDS = 50


def split_sentences(text: str | None, max_sentences: int = MAX_SENTENCES) -> list[str]:
    if not text or not text.strip():
        return []
    parts = []
    for part in _BOUNDARY.split(" ".join(text.split())):
        words = part.split()
        size = -(-len(words) // -(-len(words) // MAX_WORDS)) if words else 1
        parts.extend(" ".join(words[i:i + size]) for i in range(0, len(words), size))
    return parts[:max_sentences]


@dataclass(frozen=True)
class ArticleResult:
    prediction: Prediction
    units: int  # headline + body sentences that were classified


def aggregate(units: Sequence[Prediction]) -> tuple[str | None, dict[str, float], list[float]]:
    """Confidence-weighted mean of the unit probabilities: a unit counts by how sure it is
    (its top probability), so hedged boilerplate sentences weigh less than clear ones.
    Failed units are left out; (label, probabilities, weights)."""
    ok = [u for u in units if u.failure is None and u.label is not None]
    if not ok:
        return None, {}, []
    probs = np.array([[u.probabilities.get(label, 0.0) for label in LABELS] for u in ok])
    weights = probs.max(axis=1)
    mean = (probs * weights[:, None]).sum(axis=0) / weights.sum()
    return LABELS[int(mean.argmax())], {label: round(float(p), 6)
                                         for label, p in zip(LABELS, mean, strict=True)}, \
        weights.tolist()


def classify_articles(classifier: Classifier, headlines: Sequence[str],
                      bodies: Sequence[str | None], *, explain: bool = True
                      ) -> list[ArticleResult]:
    """One prediction per article. Encoder/hf backends see the headline and each body sentence
    (the headline explained); an LLM sees the headline and body together in one prompt."""
    if getattr(classifier, "backend", "") == "llm":
        texts = [h if not b else f"{h}\n\n{b}" for h, b in zip(headlines, bodies, strict=True)]
        return [ArticleResult(p, 1) for p in classifier.classify(texts, explain=explain)]
    head_preds = classifier.classify(list(headlines), explain=explain)
    sentences = [split_sentences(b) for b in bodies]
    flat = [s for group in sentences for s in group]
    body_preds = classifier.classify(flat, explain=False) if flat else []
    out, cursor = [], 0
    for head, group in zip(head_preds, sentences, strict=True):
        preds = body_preds[cursor:cursor + len(group)]
        cursor += len(group)
        if not group:
            out.append(ArticleResult(head, 1))
            continue
        label, probs, weights = aggregate([head, *preds])
        explanation: dict[str, Any] = dict(head.explanation)
        explanation["aggregation"] = {
            "method": "confidence-weighted mean over headline and body sentences",
            "units": 1 + len(group),
            "headline": {"label": head.label, "probabilities": head.probabilities},
            "sentences": sorted(
                ({"text": s[:200], "label": p.label, "weight": round(w, 4)}
                 for s, p, w in zip(group, preds, weights[1:], strict=False)),
                key=lambda x: -x["weight"])[:5],
        }
        out.append(ArticleResult(Prediction(label, probs, explanation), 1 + len(group)))
    return out
