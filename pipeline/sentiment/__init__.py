"""News sentiment: positive / negative / neutral, with an explanation for every label.

Three backends share one interface (:class:`Classifier`): ``encoder`` (the packaged MiniLM
fine-tuned here, :mod:`pipeline.sentiment.backends`), ``hf`` (any local Hugging Face
sequence-classification checkpoint) and ``llm`` (a local causal LM or an OpenAI-compatible
endpoint, :mod:`pipeline.sentiment.llm`). Every backend returns one :class:`Prediction` per text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}


@dataclass(frozen=True)
class Prediction:
    """One text's label, per-class probabilities, and why.

    ``failure`` is set (and ``label`` is None) when a backend could not produce a valid answer
    (an LLM that kept answering outside the schema): the batch goes on, the failure is recorded.
    """

    label: str | None
    probabilities: dict[str, float]
    explanation: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None

    @property
    def confidence(self) -> float:
        return float(self.probabilities.get(self.label, 0.0)) if self.label else 0.0

    @property
    def score(self) -> float:
        """Signed score in [-1, 1]: P(positive) - P(negative)."""
        return signed_score(self.probabilities)


def signed_score(probabilities: Mapping[str, float]) -> float:
    return float(probabilities.get("positive", 0.0)) - float(probabilities.get("negative", 0.0))


class Classifier(Protocol):
    """What every backend provides."""

    backend: str
    model_id: str  # which exact model: name@weights-hash, or endpoint#model

    def classify(self, texts: Sequence[str], *, explain: bool = True) -> list[Prediction]: ...

    def audit_fields(self) -> dict[str, Any]:
        """Model identity for the ledger: weights hash or endpoint and model name, prompt hash."""
        ...


def canonical_label(name: object) -> str | None:
    """Map common spellings (bullish, pos, Negative, LABEL names with words) to a label."""
    text = str(name).strip().lower()
    return _SYNONYMS.get(text)


_SYNONYMS = {
    **dict.fromkeys(("negative", "neg", "bearish", "bear", "down"), "negative"),
    **dict.fromkeys(("neutral", "neu", "none", "mixed", "flat"), "neutral"),
    **dict.fromkeys(("positive", "pos", "bullish", "bull", "up"), "positive"),
}
