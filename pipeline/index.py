"""FAISS index of labelled transaction history, saved as a versioned, hash-checked artifact.

Exact search (``IndexFlatL2``) below ``exact_max`` vectors, HNSW above it (IVF on a GPU, where
HNSW does not run), IVF past ``ivf_min`` (10M) vectors, where HNSW's graph no longer fits in
memory comfortably. Approximate indexes record their recall@k against exact search.
On the GPU when faiss was built with CUDA and a device is present (flat and IVF indexes; HNSW
stays on the CPU), sharded over every GPU when there are several; ``gpu_float16`` holds a flat
index's vectors there in half precision (brute force at half the memory traffic, no longer exact).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import polars as pl

from pipeline import artifacts, schema
from pipeline.encoder import TextEncoder
from pipeline.vectors import TransactionVectorizer, VectorConfig

log = logging.getLogger(__name__)

INDEXES_ENV = "FINSENTINEL_INDEXES"
# Every file FraudIndex.load reads: each must be in the manifest, with its hash checked first.
INDEX_FILES = ("index.faiss", "meta.parquet", "context.parquet", "vectorizer.npz",
               "vectorizer.json")
META_COLUMNS = (schema.TRANSACTION_ID, schema.TX_TIME, "label_time", schema.IS_FRAUD,
                schema.CUSTOMER_ID, schema.TERMINAL_ID)


def default_root() -> Path:
    """``$FINSENTINEL_INDEXES``, else ``./indexes``; a blank value counts as unset (as for
    every setting, see pipeline.settings), not as the current folder."""
    import os

    return Path(os.environ.get(INDEXES_ENV, "").strip() or "indexes")


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass(frozen=True)
class IndexConfig:
    """kind 'auto' picks exact search up to ``exact_max`` vectors, approximate above it (IVF
    past ``ivf_min``). ``ivf_nlist``: IVF cells (default 4·sqrt(n)). ``recall_queries``:
    history vectors searched both ways to measure an approximate index's recall@k."""

    kind: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    exact_max: int = 250_000
    hnsw_m: int = 32
    hnsw_ef_search: int = 64  # recall@10 0.992 at 1M vectors, 1.8x the speed of 128
    ivf_nprobe: int = 16
    ivf_min: int = 10_000_000
    ivf_nlist: int | None = None
    recall_queries: int = 1000
    label_delay_days: int = 7
    use_gpu: bool | None = None  # None: use one when available
    # Brute force on a GPU with the vectors in half precision: half the memory and traffic,
    # distances approximate. Flat indexes only (faiss keeps IVF lists in float32).
    gpu_float16: bool = False
    context_days: float = 37.0   # raw history kept for feature windows (30 days + 7 delay)


def _choose_kind(config: IndexConfig, n: int, on_gpu: bool) -> str:
    if config.kind != "auto":
        return config.kind
    if n <= config.exact_max:
        return "flat"
    return "ivf" if on_gpu or n > config.ivf_min else "hnsw"


def set_search_settings(index: faiss.Index, config: IndexConfig) -> faiss.Index:
    """An index read from its file searched as built: faiss does not keep HNSW's efSearch nor
    IVF's nprobe in the file (it reads back its defaults: 16 and 1)."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.hnsw_ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = config.ivf_nprobe
    return index


def _make_index(kind: str, vectors: np.ndarray, config: IndexConfig) -> faiss.Index:
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = config.hnsw_ef_search
    elif kind == "ivf":
        nlist = config.ivf_nlist or max(1, int(4 * np.sqrt(len(vectors))))
        nlist = min(nlist, len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        sample = vectors[np.random.default_rng(0).permutation(len(vectors))[: nlist * 64]]
        index.train(sample)
        index.nprobe = config.ivf_nprobe
    else:
        raise ValueError(f"unknown index kind {kind!r}: expected auto, flat, hnsw or ivf")
    index.add(vectors)
    return index


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact k nearest neighbours (row positions, -1 for none) that an approximate
    search also found, over all queries: recall@k."""
    if found.shape != exact.shape:
        raise ValueError(f"recall@k: shapes differ: {found.shape} vs {exact.shape}")
    hits = total = 0
    for got, want in zip(found, exact, strict=True):
        want = want[want >= 0]
        hits += int(np.isin(want, got).sum())
        total += len(want)
    return hits / total if total else 1.0


def measure_recall(index: faiss.Index, vectors: np.ndarray, k: int = 10,
                   queries: int = 1000, seed: int = 0) -> float:
    """recall@k of ``index`` (holding ``vectors``) against exact search, with a sample of the
    vectors themselves as queries, each leaving itself out: a query finds its own vector in
    any index (its own list, its own graph node), which would count as a hit for free, while
    the transactions scored are not in the index."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    k = min(k, len(vectors) - 1)
    if k < 1:
        return 1.0
    picked = np.sort(np.random.default_rng(seed).choice(
        len(vectors), min(queries, len(vectors)), replace=False))
    sample = vectors[picked]
    exact = faiss.IndexFlatL2(vectors.shape[1])
    exact.add(vectors)
    _, want = exact.search(sample, k + 1)
    _, got = index.search(sample, k + 1)
    return recall_at_k(_others(got, picked, k), _others(want, picked, k))


def _others(positions: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` positions other than its own (-1 where fewer)."""
    out = np.full((len(positions), k), -1, dtype=np.int64)
    for row, (found, self_position) in enumerate(zip(positions, own, strict=True)):
        rest = found[(found != self_position) & (found >= 0)][:k]
        out[row, :len(rest)] = rest
    return out


# faiss's GPU k-selection stops at 2048 neighbours; deeper searches go to the CPU copy.
GPU_MAX_K = 2048
# Distances one search call of FraudIndex.neighbours may hold (rows x depth): about 0.8 GB with
# the positions and the masks made from them.
NEIGHBOUR_SEARCH_ELEMENTS = 1 << 25


def _to_gpu(index: faiss.Index, float16: bool = False) -> faiss.Index:
    """A GPU copy of a flat or IVF index (sharded over every GPU when there are several);
    HNSW has no GPU version in faiss (its cloner raises): returned as it is, and said so."""
    if isinstance(index, faiss.IndexHNSW):
        log.warning("HNSW index: faiss has no GPU version of HNSW, so it is searched on the "
                    "CPU (build it with --kind flat or --kind ivf to search on the GPU)")
        return index
    if faiss.get_num_gpus() > 1:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        options.useFloat16 = float16
        return faiss.index_cpu_to_all_gpus(index, options)
    options = faiss.GpuClonerOptions()
    options.useFloat16 = float16
    resources = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(resources, 0, index, options)
    gpu.referenced_objects = [resources]  # as faiss's own wrappers do: keep it alive with gpu
    return gpu


def manifest_version(manifest: dict[str, Any]) -> str:
    """``name@version`` as the ledger records an index: the name saved in its manifest, which
    stays with a copied or renamed index folder."""
    return f"{manifest.get('name', '?')}@{manifest.get('version', 'unsaved')}"


class FraudIndex:
    """Labelled history: vectors in FAISS plus, per vector, its id, time, label and label time."""

    def __init__(self, vectorizer: TransactionVectorizer, index: faiss.Index, meta: pl.DataFrame,
                 context: pl.DataFrame, manifest: dict[str, Any], config: IndexConfig):
        self.vectorizer = vectorizer
        self.index = index
        self.meta = meta
        self.context = context
        self.manifest = manifest
        self.config = config
        self._label_time = meta["label_time"].dt.epoch("us").to_numpy()
        self._labels = meta[schema.IS_FRAUD].to_numpy().astype(np.int8)
        self._ids = meta[schema.TRANSACTION_ID].to_numpy()
        self._sorted_label_time: np.ndarray | None = None
        self._id_frame: pl.DataFrame | None = None
        wanted = config.use_gpu if config.use_gpu is not None else gpu_available()
        self._search_index = (_to_gpu(index, config.gpu_float16) if wanted and gpu_available()
                              else index)
        # What the searches really run on: an HNSW index, or no GPU, keeps them on the CPU.
        self.gpu = self._search_index is not index
        self.model = None  # optional StackedModel (pipeline.stacking), saved beside the index

    @property
    def search_device(self) -> str:
        """Where searches run, as decisions record it: cpu, gpu, or gpu-float16 (a flat index
        searched in half precision)."""
        if not self.gpu:
            return "cpu"
        flat = isinstance(self.index, faiss.IndexFlat)
        return "gpu-float16" if flat and self.config.gpu_float16 else "gpu"

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def fraud_rate(self) -> float:
        return float(self._labels.mean()) if len(self._labels) else 0.0

    @property
    def version(self) -> str:
        return manifest_version(self.manifest)

    @classmethod
    def build(cls, history: pl.DataFrame, *, encoder: TextEncoder | None,
              vector_config: VectorConfig | None = None, config: IndexConfig | None = None,
              until: datetime | None = None) -> FraudIndex:
        """Index the rows of ``history`` (with features and ``is_fraud``) whose label was known at
        ``until`` (label time = transaction time + label delay); all rows when ``until`` is None.
        A ``label_time`` column, where not null, gives a row's label time instead (an analyst's
        review: the label is known from the review on)."""
        config = config or IndexConfig()
        if schema.IS_FRAUD not in history.columns:
            raise ValueError("index build needs labelled history: column 'is_fraud' is missing")
        delay = timedelta(days=config.label_delay_days)
        default_time = pl.col(schema.TX_TIME) + delay
        history = history.with_columns(
            (pl.coalesce(pl.col("label_time").cast(pl.Datetime("us")), default_time)
             if "label_time" in history.columns else default_time).alias("label_time"),
            pl.col(schema.IS_FRAUD).cast(pl.Int8),
        )
        labelled = history.filter(pl.col(schema.IS_FRAUD).is_not_null())
        if until is not None:
            labelled = labelled.filter(pl.col("label_time") <= until)
        if labelled.height == 0:
            raise ValueError("no labelled transaction has its label known at the cutoff "
                             f"{until}: nothing to index")
        vectorizer = TransactionVectorizer(vector_config, encoder).fit(labelled)
        vectors = vectorizer.transform(labelled)
        on_gpu = bool(config.use_gpu if config.use_gpu is not None else gpu_available())
        kind = _choose_kind(config, len(vectors), on_gpu)
        index = _make_index(kind, vectors, config)
        recall = None if kind == "flat" else measure_recall(index, vectors, 10,
                                                            config.recall_queries)
        end = history[schema.TX_TIME].max()
        # The windows of transactions scored after the cutoff look back from it: keep the
        # history from `context_days` before the cutoff (or the file's end, if earlier) on.
        start = min(end, until) if until is not None else end
        context_cols = [c for c in history.columns
                        if c in schema.DTYPES and c != schema.FRAUD_SCENARIO]
        context = history.filter(
            pl.col(schema.TX_TIME) > start - timedelta(days=config.context_days)
        )
        if until is not None:  # labels not yet known at the cutoff are not known to us either
            context = context.with_columns(
                pl.when(pl.col("label_time") <= until).then(pl.col(schema.IS_FRAUD))
                .otherwise(None).alias(schema.IS_FRAUD)
            )
        context = context.select(context_cols)
        meta = labelled.select(*META_COLUMNS, *vectorizer.config.numeric_features)
        manifest = {
            "kind": "fraud-knn-index",
            "faiss_index": kind,
            "recall_at_10": recall,  # against exact search; None: the index is exact
            "dimension": int(vectors.shape[1]),
            "vector_count": int(len(vectors)),
            "fraud_count": int(labelled[schema.IS_FRAUD].sum()),
            "label_cutoff": (until or labelled["label_time"].max()).isoformat(),
            "history_start": labelled[schema.TX_TIME].min().isoformat(),
            "history_end": labelled[schema.TX_TIME].max().isoformat(),
            "label_delay_days": config.label_delay_days,
            "encoder": ({"id": encoder.model_ref, "weights_sha256": encoder.weights_hash,
                         "model_id": encoder.model_id} if vectorizer.use_text_ else None),
            "index_config": asdict(config),
            "libraries": _library_versions(),
        }
        return cls(vectorizer, index, meta, context, manifest, config)

    def save(self, name: str, root: str | Path | None = None) -> str:
        """Write atomically as a new version of ``root/name`` and return the version."""
        root = Path(root) if root else default_root()
        # publish() updates self.manifest with what it wrote: this version, not CURRENT's,
        # which a concurrent build of the same name may have switched already.
        with artifacts.publish(root, name, self.manifest) as directory:
            faiss.write_index(self.index, str(directory / "index.faiss"))
            self.meta.write_parquet(directory / "meta.parquet")
            self.context.write_parquet(directory / "context.parquet")
            self.vectorizer.save(directory)
            if self.model is not None:
                self.model.save(directory)
        return self.manifest["version"]

    @classmethod
    def load(cls, name: str, root: str | Path | None = None, *, version: str | None = None,
             encoder: TextEncoder | None = None, use_gpu: bool | None = None,
             gpu_float16: bool | None = None) -> FraudIndex:
        """Load after checking every file against the manifest hashes, and the encoder's
        weights against the ones the index was built with. ``use_gpu`` (None: when there is
        one) and ``gpu_float16`` (None: as built) choose where and how it searches."""
        root = Path(root) if root else default_root()
        directory, manifest = artifacts.resolve(root, name, version, require=INDEX_FILES)
        recorded = manifest.get("encoder")
        if recorded:
            encoder = encoder or TextEncoder(recorded["id"])
            if encoder.weights_hash != recorded["weights_sha256"]:
                raise artifacts.ArtifactError(
                    f"index {name!r} was built with encoder {recorded['id']} weights "
                    f"{recorded['weights_sha256'][:12]}…, but the encoder given has "
                    f"{encoder.weights_hash[:12]}…")
        vectorizer = TransactionVectorizer.load(directory, encoder if recorded else None)
        index = _read_index(directory, manifest)
        config = IndexConfig(**{**_recorded_config(directory, manifest), "use_gpu": use_gpu})
        if gpu_float16 is not None:
            config = replace(config, gpu_float16=gpu_float16)
        set_search_settings(index, config)
        meta = pl.read_parquet(directory / "meta.parquet")
        _check_contents(directory, manifest, index, vectorizer.dimension, meta.height)
        context = pl.read_parquet(directory / "context.parquet")
        loaded = cls(vectorizer, index, meta, context, manifest, config)
        if manifest.get("model"):  # a stacked model: its files were hash-checked with the rest
            from pipeline.stacking import StackedModel

            unlisted = [f for f in manifest["model"]["files"] if f not in manifest["files"]]
            if unlisted:
                raise artifacts.ArtifactError(
                    f"index {name!r} version {manifest['version']}: model file(s) {unlisted} "
                    "are not in the manifest, so their hashes cannot be checked")
            loaded.model = StackedModel.load(directory)
        return loaded

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances and row positions in ``meta``, k columns (-1 positions where
        fewer than k exist; inf distances past the index's size). ValueError for query vectors
        of another dimension or not finite. On a GPU index, a k beyond faiss's GPU limit is
        searched on the CPU copy."""
        return self._search(_check_queries(vectors, int(self.index.d), self.version), k)

    def _search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` of query vectors already checked (contiguous float32, finite, the
        index's dimension)."""
        depth = min(k, self.size)
        if depth < 1 or len(vectors) == 0:
            distances = np.empty((len(vectors), 0), dtype=np.float32)
            positions = np.empty((len(vectors), 0), dtype=np.int64)
        else:
            index = self._search_index if depth <= GPU_MAX_K else self.index
            distances, positions = index.search(vectors, depth)
        if depth < k:
            pad = ((0, 0), (0, k - max(depth, 0)))
            distances = np.pad(distances, pad, constant_values=np.inf)
            positions = np.pad(positions, pad, constant_values=-1)
        return distances, positions

    def neighbours(self, vectors: np.ndarray, tx_time_us: np.ndarray, tx_ids: np.ndarray, k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest neighbours whose label was known at each query's own time (and that
        are not the query itself). Returns (distances, positions), -1 positions where fewer.

        Candidates are over-fetched only as far as needed: queries after the index's last label
        time need k + 1; the rest are searched again with a quadrupled depth until each has k,
        or every label known at its time (a query older than the index's labels, a back-fill,
        has few or none: it stops there instead of searching the whole index). No search call
        holds more than ``NEIGHBOUR_SEARCH_ELEMENTS`` distances: deep searches go a slice of
        the rows at a time."""
        n = len(vectors)
        out_d = np.full((n, k), np.inf, dtype=np.float32)
        out_p = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or k == 0 or self.size == 0:
            return out_d, out_p
        vectors = _check_queries(vectors, int(self.index.d), self.version)
        tx_time_us = np.asarray(tx_time_us)
        latest_label = self._label_time.max()
        depth = k + 1 if tx_time_us.min() >= latest_label else 2 * k + 1
        # How many neighbours each row can have at most: the labels known at its time, less
        # its own (an indexed transaction scored again).
        wanted = np.minimum(self._known_count(tx_time_us, tx_ids), k)
        todo = np.flatnonzero(wanted > 0)
        while len(todo):
            depth = min(depth, self.size)
            rows_per_call = max(1, NEIGHBOUR_SEARCH_ELEMENTS // depth)
            unfinished = []
            for first in range(0, len(todo), rows_per_call):
                part = todo[first:first + rows_per_call]
                distances, positions = self._search(vectors[part], depth)
                safe = np.where(positions >= 0, positions, 0)
                valid = (positions >= 0) & (self._label_time[safe] <= tx_time_us[part, None])
                valid &= self._ids[safe] != tx_ids[part, None]
                rank = np.cumsum(valid, axis=1)
                done = (rank[:, -1] >= wanted[part]) | (depth >= self.size)
                keep = valid & (rank <= k) & done[:, None]
                rows, cols = np.nonzero(keep)
                slot = rank[rows, cols] - 1
                out_d[part[rows], slot] = distances[rows, cols]
                out_p[part[rows], slot] = positions[rows, cols]
                unfinished.append(part[~done])
            todo = np.concatenate(unfinished)
            depth *= 4
        return out_d, out_p

    def _known_count(self, tx_time_us: np.ndarray, tx_ids: np.ndarray) -> np.ndarray:
        """Per query: the indexed labels known at its time, not counting its own."""
        if self._sorted_label_time is None:
            self._sorted_label_time = np.sort(self._label_time)
        known = np.searchsorted(self._sorted_label_time, tx_time_us, side="right")
        if self._id_frame is None:
            self._id_frame = pl.DataFrame({"_id": pl.Series(self._ids).cast(pl.String),
                                           "_label_time": self._label_time})
        own = (pl.DataFrame({"_id": pl.Series(np.asarray(tx_ids)).cast(pl.String),
                             "_t": tx_time_us})
               .with_row_index("_row")
               .join(self._id_frame, on="_id", how="inner")
               .filter(pl.col("_label_time") <= pl.col("_t"))
               .group_by("_row").len())
        known = known.astype(np.int64)
        np.subtract.at(known, own["_row"].to_numpy(), own["len"].to_numpy().astype(np.int64))
        return known

    def labels_at(self, positions: np.ndarray) -> np.ndarray:
        return np.where(positions >= 0, self._labels[np.where(positions >= 0, positions, 0)], 0)


def _check_queries(vectors: np.ndarray, dimension: int, version: str) -> np.ndarray:
    """``vectors`` as float32 rows, refused where they cannot be searched: another dimension
    than the index's (faiss: a bare AssertionError), or NaN/inf (faiss: no neighbour found,
    so a score of the prior, silently)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dimension:
        raise ValueError(f"query vectors of dimension {vectors.shape[-1] if vectors.ndim else 0}"
                         f" (shape {vectors.shape}), but index {version} holds "
                         f"{dimension}-dimensional vectors")
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise ValueError(f"{len(bad)} query vector(s) with NaN or infinite values (first: row "
                         f"{bad[0]}): index {version} cannot search them")
    return vectors


def _read_index(directory: Path, manifest: dict[str, Any]) -> faiss.Index:
    """The FAISS file, or an ArtifactError naming it where this faiss cannot read it (one
    written by another faiss version)."""
    path = directory / "index.faiss"
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        built = (manifest.get("libraries") or {}).get("faiss", "an unrecorded version")
        raise artifacts.ArtifactError(
            f"{path}: not an index faiss {faiss.__version__} can read (written with faiss "
            f"{built}): {exc}") from exc


def _recorded_config(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's index_config, refused (naming the manifest) where this version cannot
    search as the index was built: missing, or with settings it does not know."""
    path = directory / artifacts.MANIFEST
    recorded = manifest.get("index_config")
    if not isinstance(recorded, dict):
        raise artifacts.ArtifactError(
            f"{path}: no index_config (the settings the index was built with); written by "
            "another finsentinel version, or not a fraud index")
    unknown = sorted(set(recorded) - {f.name for f in fields(IndexConfig)})
    if unknown:
        raise artifacts.ArtifactError(
            f"{path}: written by another finsentinel version: index_config has settings this "
            f"version does not know ({', '.join(unknown)}); load it with that version")
    return recorded


def _check_contents(directory: Path, manifest: dict[str, Any], index: faiss.Index,
                    vector_dimension: int, meta_rows: int) -> None:
    """The FAISS file holds what the manifest, meta.parquet and the vectorizer describe: a
    position must name its metadata row, a query the index's dimension."""
    count, dimension = int(index.ntotal), int(index.d)
    expected = (manifest.get("vector_count"), manifest.get("dimension"))
    if ((count, dimension) != expected or meta_rows != count
            or vector_dimension != dimension):
        raise artifacts.ArtifactError(
            f"{directory / 'index.faiss'}: {count} vectors of dimension {dimension}, but the "
            f"manifest records {expected[0]} of dimension {expected[1]}, meta.parquet has "
            f"{meta_rows} rows and the vectorizer makes {vector_dimension}-dimensional vectors")


def _library_versions() -> dict[str, str]:
    import sentence_transformers
    import torch

    return {"faiss": faiss.__version__, "polars": pl.__version__, "numpy": np.__version__,
            "torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
            "python": platform.python_version()}
