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
        if len(vectors) == 0 or not self.rows:
            return [[] for _ in range(len(vectors))]
        similarity, index = self.index.search(_normalise(vectors), min(k, len(self.rows)))
        return [[{**self.rows[j], "similarity": round(float(s), 4)}
                 for s, j in zip(sims, idx, strict=True) if j >= 0]
                for sims, idx in zip(similarity, index, strict=True)]
