"""One vector per transaction: standardised, weighted numeric features joined with a
PCA-reduced sentence embedding of the transaction's descriptive text.

The numeric part carries the handbook's behavioural evidence; the text part lets neighbours
share merchant type, channel and geography, which numbers alone do not express.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from pipeline import schema
from pipeline.encoder import TextEncoder
from pipeline.features import AMOUNT_RATIO_FEATURES, with_derived_features

TEXT_FIELDS = (schema.CHANNEL, schema.MERCHANT_CATEGORY, schema.MERCHANT_NAME, schema.COUNTRY,
               schema.CURRENCY, schema.DESCRIPTION)


def description_expr(columns: list[str] | tuple[str, ...]) -> pl.Expr:
    """A short English description from whichever descriptive fields a frame has, e.g.
    ``card-not-present electronics at Bluefin Online; country DE; currency EUR``."""
    parts: list[pl.Expr] = []
    if schema.CHANNEL in columns:
        parts.append(pl.col(schema.CHANNEL))
    if schema.MERCHANT_CATEGORY in columns:
        parts.append(pl.col(schema.MERCHANT_CATEGORY))
    if schema.MERCHANT_NAME in columns:
        parts.append(pl.lit("at ") + pl.col(schema.MERCHANT_NAME))
    if schema.COUNTRY in columns:
        parts.append(pl.lit("; country ") + pl.col(schema.COUNTRY))
    if schema.CURRENCY in columns:
        parts.append(pl.lit("; currency ") + pl.col(schema.CURRENCY))
    if schema.DESCRIPTION in columns:
        parts.append(pl.lit("; ") + pl.col(schema.DESCRIPTION))
    if not parts:  # one empty text per row (a bare literal would be a single row in select)
        return pl.repeat(pl.lit("", dtype=pl.String), pl.len()).alias("text")
    return (
        pl.concat_str([p.fill_null("") for p in parts], separator=" ")
        .str.replace_all(r"\s+", " ")
        .str.replace_all(r" ;", ";")
        .str.strip_chars(" ;")
        .alias("text")
    )


def has_text(columns: list[str] | tuple[str, ...]) -> bool:
    return any(c in columns for c in TEXT_FIELDS)


@dataclass(frozen=True)
class VectorConfig:
    """How a transaction becomes a vector.

    numeric_weights: per-feature multipliers after standardisation (default 1.0 each).
    text_weight: norm of the text part relative to one standardised numeric feature.
    text_dim: PCA dimension of the sentence embedding (0 disables the text part).
    log_features: features that are heavy-tailed and are log1p-transformed first.
    """

    numeric_features: tuple[str, ...] = schema.MODEL_FEATURES
    numeric_weights: dict[str, float] = field(default_factory=dict)
    text_weight: float = 1.0
    text_dim: int = 8
    log_features: tuple[str, ...] = (
        schema.AMOUNT,
        "CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW",
        "CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW",
        "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW",
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.numeric_weights) - set(self.numeric_features))
        if unknown:
            raise ValueError(f"feature weights for features the vector does not have: {unknown}")
        bad = {name: w for name, w in self.numeric_weights.items()
               if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"feature weights must be finite and >= 0, got {bad}")
        if not (math.isfinite(self.text_weight) and self.text_weight >= 0):
            raise ValueError(f"text_weight must be finite and >= 0, got {self.text_weight}")
        if self.text_dim < 0:
            raise ValueError(f"text_dim must be >= 0, got {self.text_dim}")


class TransactionVectorizer:
    """``fit`` on labelled history, then ``transform`` any frame with the same features."""

    def __init__(self, config: VectorConfig | None = None, encoder: TextEncoder | None = None):
        self.config = config or VectorConfig()
        self.encoder = encoder
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None
        self.pca_mean_: np.ndarray | None = None
        self.pca_components_: np.ndarray | None = None
        self.text_scale_: float = 0.0
        self.use_text_: bool = False

    @property
    def dimension(self) -> int:
        text = self.pca_components_.shape[0] if self.use_text_ else 0
        return len(self.config.numeric_features) + text

    def _numeric(self, frame: pl.DataFrame) -> np.ndarray:
        if any(c in AMOUNT_RATIO_FEATURES for c in self.config.numeric_features):
            frame = with_derived_features(frame)
        missing = [c for c in self.config.numeric_features if c not in frame.columns]
        if missing:
            raise ValueError(f"cannot vectorise: missing feature columns {missing}")
        exprs = [
            (pl.col(c).cast(pl.Float64).clip(lower_bound=0).log1p() if c in self.config.log_features
             else pl.col(c).cast(pl.Float64)).alias(c)
            for c in self.config.numeric_features
        ]
        x = frame.select(exprs).to_numpy().astype(np.float64)
        finite = np.isfinite(x)
        if not finite.all():
            # A null (NaN here) or infinite feature would make the fitted mean NaN, or a query
            # vector non-finite, and its neighbours meaningless.
            bad = [f"{c!r} ({int((~finite[:, j]).sum())} rows)"
                   for j, c in enumerate(self.config.numeric_features) if not finite[:, j].all()]
            raise ValueError(f"cannot vectorise: missing or non-finite values in {', '.join(bad)}")
        return x

    def _weights(self) -> np.ndarray:
        return np.array([self.config.numeric_weights.get(c, 1.0)
                         for c in self.config.numeric_features])

    def fit(self, frame: pl.DataFrame) -> TransactionVectorizer:
        x = self._numeric(frame)
        self.mean_ = x.mean(axis=0)
        std = x.std(axis=0)
        self.std_ = np.where(std > 1e-12, std, 1.0)
        self.use_text_ = (self.config.text_dim > 0 and self.encoder is not None
                          and has_text(frame.columns))
        if self.use_text_:
            texts = frame.select(description_expr(frame.columns))["text"].unique().sort()
            emb = self.encoder.encode(texts.to_list()).astype(np.float64)
            self.pca_mean_ = emb.mean(axis=0)
            centred = emb - self.pca_mean_
            dim = min(self.config.text_dim, max(1, min(centred.shape) - 1))
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            self.pca_components_ = vt[:dim]
            reduced = centred @ self.pca_components_.T
            rms = float(np.sqrt((reduced**2).sum(axis=1).mean())) or 1.0
            self.text_scale_ = self.config.text_weight / rms
        return self

    def transform(self, frame: pl.DataFrame) -> np.ndarray:
        if self.mean_ is None:
            raise RuntimeError("TransactionVectorizer is not fitted")
        numeric = (self._numeric(frame) - self.mean_) / self.std_ * self._weights()
        parts = [numeric]
        if self.use_text_:
            # Each distinct text is embedded and projected once, then gathered per row: a
            # batch has far fewer merchants than rows.
            texts = frame.select(description_expr(frame.columns))["text"]
            distinct = texts.unique().sort()
            rows = texts.cast(pl.Enum(distinct.to_list())).to_physical().to_numpy()
            emb = self.encoder.encode(distinct.to_list()).astype(np.float64)
            projected = (emb - self.pca_mean_) @ self.pca_components_.T * self.text_scale_
            parts.append(projected[rows])
        return np.ascontiguousarray(np.hstack(parts), dtype=np.float32)

    def save(self, directory: str | Path) -> None:
        """Plain arrays and JSON — no pickle, so loading an artifact never runs code."""
        directory = Path(directory)
        arrays = {"mean": self.mean_, "std": self.std_}
        if self.use_text_:
            arrays |= {"pca_mean": self.pca_mean_, "pca_components": self.pca_components_}
        np.savez(directory / "vectorizer.npz", **arrays)
        meta = {"config": asdict(self.config), "text_scale": self.text_scale_,
                "use_text": self.use_text_}
        (directory / "vectorizer.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path, encoder: TextEncoder | None) -> TransactionVectorizer:
        directory = Path(directory)
        meta = json.loads((directory / "vectorizer.json").read_text())
        cfg = meta["config"]
        config = VectorConfig(
            numeric_features=tuple(cfg["numeric_features"]),
            numeric_weights=dict(cfg["numeric_weights"]),
            text_weight=cfg["text_weight"],
            text_dim=cfg["text_dim"],
            log_features=tuple(cfg["log_features"]),
        )
        self = cls(config, encoder)
        with np.load(directory / "vectorizer.npz", allow_pickle=False) as arrays:
            self.mean_, self.std_ = arrays["mean"], arrays["std"]
            if meta["use_text"]:
                self.pca_mean_ = arrays["pca_mean"]
                self.pca_components_ = arrays["pca_components"]
        self.use_text_ = meta["use_text"]
        self.text_scale_ = meta["text_scale"]
        if self.use_text_ and encoder is None:
            raise ValueError("this vectorizer uses text embeddings: pass the encoder")
        return self
