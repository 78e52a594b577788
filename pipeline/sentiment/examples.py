"""Nearest labelled training examples, found with FAISS: "this headline was labelled negative,
and these are the training sentences the model sees as closest, with their labels"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.sentiment import LABELS
from pipeline.sentiment.data import LabelledTexts

EXAMPLES_TENSORS = "examples.safetensors"
EXAMPLES_ROWS = "examples.jsonl"


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.clip(norms, 1e-12, None)


def save_examples(directory: Path, pooled: np.ndarray, data: LabelledTexts) -> None:
    from safetensors.numpy import save_file

    save_file({"embeddings": _normalise(pooled), "labels": data.labels.astype(np.int64)},
              str(directory / EXAMPLES_TENSORS))
    with open(directory / EXAMPLES_ROWS, "w", encoding="utf-8") as handle:
        for id_, text, label in zip(data.ids, data.texts, data.labels.tolist(), strict=True):
            # ASCII escapes: texts may hold U+2028 and other characters that split lines.
            handle.write(json.dumps({"id": id_, "text": text, "label": LABELS[label]}) + "\n")


class NearestExamples:
    """Cosine-similarity search over the training set's pooled embeddings (exact, inner
    product on unit vectors)."""

    def __init__(self, embeddings: np.ndarray, rows: list[dict[str, Any]]):
        import faiss

        if len(embeddings) != len(rows):
            raise ValueError(f"{len(embeddings)} example vectors but {len(rows)} example rows")
        self.rows = rows
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(_normalise(embeddings))

    @classmethod
    def load(cls, directory: Path) -> NearestExamples | None:
        if not (directory / EXAMPLES_TENSORS).exists():
            return None
        from safetensors.numpy import load_file

        tensors = load_file(str(directory / EXAMPLES_TENSORS))
        text = (directory / EXAMPLES_ROWS).read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.split("\n") if line.strip()]
        return cls(tensors["embeddings"], rows)

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, vectors: np.ndarray, k: int = 3) -> list[list[dict[str, Any]]]:
        """The ``k`` most similar training examples per vector, best first; a sentence that
        occurs more than once in the training data (same text and label) is listed once."""
        if len(vectors) == 0 or not self.rows or k < 1:
            return [[] for _ in range(len(vectors))]
        vectors = _normalise(vectors)
        fetch = min(k, len(self.rows))
        while True:
            similarity, index = self.index.search(vectors, fetch)
            out = [self._distinct(sims, idx, k)
                   for sims, idx in zip(similarity, index, strict=True)]
            if fetch == len(self.rows) or all(len(found) == k for found in out):
                return out
            fetch = min(len(self.rows), fetch * 4)

    def _distinct(self, similarity: np.ndarray, index: np.ndarray, k: int
                  ) -> list[dict[str, Any]]:
        found, seen = [], set()
        for s, j in zip(similarity, index, strict=True):
            if j < 0:
                continue
            row = self.rows[j]
            key = (row.get("text"), row.get("label"))
            if key in seen:
                continue
            seen.add(key)
            found.append({**row, "similarity": round(float(s), 4)})
            if len(found) == k:
                break
        return found
