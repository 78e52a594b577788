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
