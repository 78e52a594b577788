"""Labelled sentiment data: Financial PhraseBank files, the Twitter Financial News CSV, and any
``text,label`` file with a label map. Labels come back as indices into ``LABELS``."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.ingest import InputError, _decode
from pipeline.sentiment import LABEL_INDEX, LABELS, canonical_label

# Twitter Financial News Sentiment: 0 bearish, 1 bullish, 2 neutral.
TWITTER_LABEL_MAP = {"0": "negative", "1": "positive", "2": "neutral"}
FORMATS = ("auto", "phrasebank", "twitter", "csv")


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer labels (indices into ``LABELS``) and stable ids."""

    texts: list[str]
    labels: np.ndarray
    ids: list[str]
    source: str
    label_map: dict[str, str] | None = None
    lines: list[int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | np.ndarray) -> LabelledTexts:
        index = np.asarray(index, dtype=np.int64)
        return LabelledTexts([self.texts[i] for i in index], self.labels[index],
                             [self.ids[i] for i in index], self.source, self.label_map)

    @property
    def sha256(self) -> str:
        """Hash of the (text, label) pairs: which data a model was trained or scored on."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels.tolist(), strict=True):
            digest.update(f"{LABELS[label]}\t{text}\n".encode())
        return digest.hexdigest()

    def counts(self) -> dict[str, int]:
        return {label: int((self.labels == i).sum()) for i, label in enumerate(LABELS)}


def parse_label_map(spec: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """``"0=negative,1=positive,2=neutral"`` (or a dict) to {raw label: canonical label}."""
    if spec is None or isinstance(spec, Mapping):
        pairs = dict(spec or {})
    else:
        pairs = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            raw, sep, name = part.partition("=")
            if not sep:
                raise ValueError(f"label map: expected RAW=LABEL pairs separated by commas, got "
                                 f"{part!r} (e.g. 0=negative,1=positive,2=neutral)")
            pairs[raw.strip()] = name.strip()
    if not pairs:
        return None
    out = {}
    for raw, name in pairs.items():
        label = canonical_label(name)
        if label is None:
            raise ValueError(f"label map: {raw}={name!r} is not one of {', '.join(LABELS)}")
        out[str(raw).strip()] = label
    return out


def read_line_numbers(path: str | Path) -> list[int]:
    """0-based line numbers, one per line (the FinGPT split files)."""
    numbers = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                numbers.append(int(line))
            except ValueError as exc:
                raise InputError(f"{path}: line {n}: expected a line number, got {line!r}"
                                 ) from exc
    return numbers


def read_phrasebank(path: str | Path, lines: Sequence[int] | None = None) -> LabelledTexts:
    """``sentence@label`` per line (latin-1, CRLF). ``lines``: keep only these 0-based lines."""
    path = Path(path)
    raw = path.read_bytes().decode("latin-1").splitlines()
    chosen = range(len(raw)) if lines is None else lines
    texts, labels, ids = [], [], []
    for i in chosen:
        if not 0 <= i < len(raw):
            raise InputError(f"{path}: line number {i} is outside the file ({len(raw)} lines)")
        sentence, sep, name = raw[i].rpartition("@")
        label = canonical_label(name)
        if not sep or label is None or not sentence.strip():
            raise InputError(f"{path}: line {i}: expected 'sentence@label' with label one of "
                             f"{', '.join(LABELS)}, got {raw[i][:80]!r}")
        texts.append(sentence.strip())
        labels.append(LABEL_INDEX[label])
        ids.append(f"{path.name}:{i}")
    return LabelledTexts(texts, np.asarray(labels, dtype=np.int64), ids, str(path),
                         lines=list(chosen))


def read_text_label_csv(path: str | Path, label_map: Mapping[str, str] | None = None
                        ) -> LabelledTexts:
    """A CSV with ``text`` and ``label`` columns (and optionally ``id``). Labels are names
    (positive/bullish/…) or raw values translated by ``label_map``."""
    path = Path(path)
    text = _decode(path.read_bytes(), str(path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = {c.strip().lower(): c for c in reader.fieldnames or []}
    text_col = next((columns[c] for c in ("text", "sentence", "headline") if c in columns), None)
    label_col = next((columns[c] for c in ("label", "sentiment") if c in columns), None)
    if text_col is None or label_col is None:
        raise InputError(f"{path}: expected columns 'text' and 'label'; found "
                         f"{', '.join(reader.fieldnames or []) or '(none)'}")
    id_col = columns.get("id")
    texts, labels, ids = [], [], []
    for n, row in enumerate(reader):
        raw = (row.get(label_col) or "").strip()
        # Raw values through the map; a label that names itself (negative, Bullish, …) is read
        # as its name even with a map (evaluating a model trained with a map on named data).
        label = (label_map.get(raw) if label_map and raw in label_map else None) \
            or canonical_label(raw)
        if label is None:
            hint = (f"one of {', '.join(sorted(label_map))} (the label map) or "
                    f"{', '.join(LABELS)}" if label_map else
                    f"one of {', '.join(LABELS)}; give --label-map for numeric labels")
            raise InputError(f"{path}: row {n}: label {raw!r} is not {hint}")
        body = (row.get(text_col) or "").strip()
        if not body:
            raise InputError(f"{path}: row {n}: empty text")
        texts.append(body)
        labels.append(LABEL_INDEX[label])
        ids.append(str(row[id_col]) if id_col and row.get(id_col) else f"{path.name}:{n}")
    return LabelledTexts(texts, np.asarray(labels, dtype=np.int64), ids, str(path),
                         dict(label_map) if label_map else None)


def load_labelled(path: str | Path, *, format: str = "auto",
                  label_map: str | Mapping[str, str] | None = None,
                  lines: str | Path | Sequence[int] | None = None) -> LabelledTexts:
    """Load labelled texts in any supported format (``auto`` tells PhraseBank by its ``@``)."""
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    mapping = parse_label_map(label_map)
    if format == "auto":
        format = "csv" if path.suffix.lower() == ".csv" else "phrasebank"
    if isinstance(lines, str | Path):
        lines = read_line_numbers(lines)
    if format == "phrasebank":
        return read_phrasebank(path, lines)
    if lines is not None:
        raise ValueError("line numbers (--lines) apply to PhraseBank files only")
    if format == "twitter":
        mapping = mapping or dict(TWITTER_LABEL_MAP)
    return read_text_label_csv(path, mapping)


def stratified_split(labels: np.ndarray, fraction: float, seed: int,
                     groups: Sequence[object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices with ``fraction`` of each class held out, reproducibly.

    ``groups`` (e.g. the texts): rows of one group stay on one side, so a sentence repeated in
    the data is never both trained on and validated on. A group goes with the label of its
    first row when its rows disagree."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if groups is None:
        members_of = np.arange(len(labels))[:, None].tolist()
    else:
        if len(groups) != len(labels):
            raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
        first: dict[object, list[int]] = {}
        for i, group in enumerate(groups):
            first.setdefault(group, []).append(i)
        members_of = list(first.values())
    group_labels = np.asarray([labels[rows[0]] for rows in members_of])
    held = []
    for label in np.unique(group_labels):
        chosen = np.flatnonzero(group_labels == label)
        rng.shuffle(chosen)
        for g in chosen[: int(round(len(chosen) * fraction))].tolist():
            held.extend(members_of[g])
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)
