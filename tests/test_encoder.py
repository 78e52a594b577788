"""The packaged MiniLM encoder: real embeddings, dedupe, and the on-disk cache."""

import numpy as np
import pytest

from pipeline.encoder import EmbeddingCache, TextEncoder, text_hash


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return TextEncoder(cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")


def test_packaged_model_gives_normalised_meaningful_vectors(encoder):
    v = encoder.encode(["online electronics store purchase", "buying a laptop from a web shop",
                        "fuel station card payment"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # Semantics, not noise: the two online-electronics texts are closer than fuel.
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1


def test_each_distinct_text_is_encoded_once_and_cached(encoder, tmp_path):
    texts = ["grocery at Northgate", "grocery at Northgate", "pharmacy at Elm",
             "grocery at Northgate"]
    before = encoder.encoded_count
    v = encoder.encode(texts)
    assert encoder.encoded_count - before <= 2
    assert np.array_equal(v[0], v[1]) and np.array_equal(v[0], v[3])
    # A new encoder on the same cache directory encodes nothing for texts it has seen.
    again = TextEncoder(cache_dir=encoder.cache.path.parent, device="cpu")
    v2 = again.encode(list(reversed(texts)))
    assert again.encoded_count == 0
    assert np.allclose(v2[::-1], v, atol=1e-6)


def test_cache_is_keyed_by_model_weights(tmp_path):
    cache = EmbeddingCache(tmp_path / "e.sqlite")
    cache.put_many("model-a", {text_hash("x"): np.ones(4, dtype=np.float32)})
    assert cache.get_many("model-b", [text_hash("x")]) == {}
    assert cache.get_many("model-a", [text_hash("x")])[text_hash("x")].tolist() == [1.0] * 4


def test_weights_hash_identifies_the_weights(encoder):
    assert len(encoder.weights_hash) == 64
    assert encoder.model_id.startswith("all-MiniLM-L6-v2@")
    assert TextEncoder(device="cpu").weights_hash == encoder.weights_hash


def test_unknown_model_with_hub_off_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither the packaged default"):
        _ = TextEncoder("no-such-org/no-such-model", device="cpu").model


def test_weights_hash_is_the_same_when_the_model_runs_in_fp16(encoder, monkeypatch, tmp_path):
    """On CUDA the model runs in fp16; the weights are the same, so their hash (and the model
    id an index and every decision record) must be too: an index built on a CPU loads on a
    GPU machine, and a decision scored on a GPU replays on a CPU. Simulated on the CPU: a
    "cuda" encoder whose model is loaded on the CPU and cast to fp16 as on CUDA."""
    import sentence_transformers
    import torch

    real = sentence_transformers.SentenceTransformer

    class LoadedOnCpu(real):
        def __init__(self, *args, device=None, **kwargs):
            super().__init__(*args, device="cpu", **kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", LoadedOnCpu)
    fp32 = TextEncoder(device="cpu", cache_dir=tmp_path)
    fp16 = TextEncoder(device="cuda", cache_dir=tmp_path)
    assert next(fp16.model.parameters()).dtype == torch.float16
    assert fp16.weights_hash == fp32.weights_hash == encoder.weights_hash
    assert fp16.model_id == encoder.model_id
    # fp16 vectors differ slightly from fp32 ones: the cache keeps them apart.
    texts = ["fuel station card payment", "online electronics store"]
    v32 = fp32.encode(texts)
    v16 = fp16.encode(texts)
    assert fp16.encoded_count == 2
    assert np.allclose(v16, v32, atol=5e-3) and not np.array_equal(v16, v32)
    assert np.array_equal(TextEncoder(device="cpu", cache_dir=tmp_path).encode(texts), v32)


def test_a_corrupted_cache_row_is_encoded_again_and_repaired(encoder, tmp_path):
    """A cache row that is not a vector of the model's dimension (truncated, or NaN) must not
    stop every later encode: the text is encoded again and the row replaced."""
    import sqlite3

    texts = ["fuel station card payment", "grocery at Northgate", "pharmacy at Elm"]
    first = TextEncoder(cache_dir=tmp_path, device="cpu")
    expected = first.encode(texts)
    first.cache.close()
    nan = np.full(384, np.nan, dtype=np.float32).tobytes()
    with sqlite3.connect(tmp_path / "embeddings.sqlite") as conn:
        conn.execute("UPDATE embeddings SET vector = substr(vector, 1, 100) WHERE text_sha = ?",
                     (text_hash(texts[0]),))
        conn.execute("UPDATE embeddings SET vector = ? WHERE text_sha = ?",
                     (nan, text_hash(texts[2])))
    second = TextEncoder(cache_dir=tmp_path, device="cpu")
    second._model, second._weights_hash = encoder.model, encoder.weights_hash
    got = second.encode(texts)
    assert second.encoded_count == 2
    assert np.allclose(got, expected, atol=1e-6)
    third = TextEncoder(cache_dir=tmp_path, device="cpu")
    third._model, third._weights_hash = encoder.model, encoder.weights_hash
    assert np.allclose(third.encode(texts), expected, atol=1e-6)
    assert third.encoded_count == 0  # the rows were repaired


def test_fp16_can_be_forced_on_the_cpu(encoder, tmp_path):
    """``precision="fp16"`` runs the model in half precision on any device (on CUDA it is the
    default): how a GPU-scored decision is simulated on a CPU. Same weights hash, its own cache
    key, vectors within fp16 rounding of the fp32 ones but not equal to them."""
    import torch

    assert encoder.precision == "fp32"
    fp16 = TextEncoder(device="cpu", precision="fp16", cache_dir=tmp_path)
    assert fp16.device == "cpu" and fp16.precision == "fp16"
    assert next(fp16.model.parameters()).dtype == torch.float16
    assert fp16.weights_hash == encoder.weights_hash and fp16.model_id == encoder.model_id
    texts = ["fuel station card payment", "online electronics store"]
    v16, v32 = fp16.encode(texts), encoder.encode(texts)
    assert v16.dtype == np.float32 and not np.array_equal(v16, v32)
    assert np.linalg.norm(v16 - v32, axis=1).max() < 0.01
    fp32 = TextEncoder(device="cpu", cache_dir=tmp_path)
    # The fp16 rows were not served to fp32 (batching moves fp32 vectors by ~1e-7 only).
    assert np.allclose(fp32.encode(texts), v32, atol=1e-6) and fp32.encoded_count == 2
    with pytest.raises(ValueError, match="precision"):
        TextEncoder(device="cpu", precision="bf16")


def test_the_cache_does_not_serve_vectors_of_a_model_configured_otherwise(encoder, tmp_path):
    """The weights hash does not cover how vectors are made from the weights: the pooling
    (mean or CLS token), the longest text read, the tokenizer. A model changed only there
    (the same safetensors with another pooling config) used to be served the old model's
    cached vectors for every text it had seen: the cache key now covers them too."""
    texts = ["fuel station card payment", "online electronics store"]
    mean = TextEncoder(cache_dir=tmp_path, device="cpu")
    mean._model, mean._weights_hash = encoder.model, encoder.weights_hash
    v_mean = mean.encode(texts)
    cls = TextEncoder(cache_dir=tmp_path, device="cpu")
    model = cls.model  # its own copy, loaded from the same weights
    assert cls.weights_hash == mean.weights_hash
    model[1].pooling_mode = "cls"  # as a directory whose pooling config says CLS
    v_cls = cls.encode(texts)
    assert cls.encoded_count == 2
    assert not np.allclose(v_cls, v_mean, atol=1e-3)
    # The same configuration as the first: its cached rows are served.
    again = TextEncoder(cache_dir=tmp_path, device="cpu")
    again._model, again._weights_hash = encoder.model, encoder.weights_hash
    assert np.array_equal(again.encode(texts), v_mean) and again.encoded_count == 0


def test_a_cache_row_of_any_length_or_type_is_encoded_again(encoder, tmp_path):
    """A row cut at a length that is no multiple of 4 bytes (or stored as text) raised numpy's
    "buffer size must be a multiple of element size" (or a TypeError) in every encode of that
    text, instead of being encoded again and replaced."""
    import sqlite3

    texts = ["fuel station card payment", "grocery at Northgate"]
    first = TextEncoder(cache_dir=tmp_path, device="cpu")
    first._model, first._weights_hash = encoder.model, encoder.weights_hash
    expected = first.encode(texts)
    first.cache.close()
    with sqlite3.connect(tmp_path / "embeddings.sqlite") as conn:
        conn.execute("UPDATE embeddings SET vector = substr(vector, 1, 101) WHERE text_sha = ?",
                     (text_hash(texts[0]),))
        conn.execute("UPDATE embeddings SET vector = 'not a vector' WHERE text_sha = ?",
                     (text_hash(texts[1]),))
    second = TextEncoder(cache_dir=tmp_path, device="cpu")
    second._model, second._weights_hash = encoder.model, encoder.weights_hash
    assert np.allclose(second.encode(texts), expected, atol=1e-6)
    assert second.encoded_count == 2
    third = TextEncoder(cache_dir=tmp_path, device="cpu")
    third._model, third._weights_hash = encoder.model, encoder.weights_hash
    assert np.allclose(third.encode(texts), expected, atol=1e-6) and third.encoded_count == 0


def test_a_corrupt_cache_file_is_a_clear_error_naming_it(encoder, tmp_path):
    """A cache file that is not a SQLite database (overwritten, cut short by a full disk)
    raised sqlite3's "file is not a database" / "database disk image is malformed", naming no
    file and escaping the CLI's error handling as a traceback."""
    from pipeline.encoder import EmbeddingCacheError

    path = tmp_path / "embeddings.sqlite"
    path.write_bytes(b"not a database " * 500)
    with pytest.raises(EmbeddingCacheError, match=rf"{path}.*file is not a database.*delete"):
        TextEncoder(cache_dir=tmp_path, device="cpu")

    path.unlink()
    cache = EmbeddingCache(path)
    cache.put_many("m", {text_hash(str(i)): np.ones(384, np.float32) for i in range(3000)})
    cache._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cache.close()
    path.write_bytes(path.read_bytes()[:12288])  # the first pages only
    with pytest.raises(EmbeddingCacheError, match=rf"{path}.*malformed"):
        TextEncoder(cache_dir=tmp_path, device="cpu")
