"""Index artifacts: manifest contents, hash checks on load, atomic versions, search kinds."""

import json
from datetime import timedelta

import faiss
import numpy as np
import polars as pl
import pytest

from pipeline import artifacts, schema
from pipeline.features import compute_features
from pipeline.index import FraudIndex, IndexConfig
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig


@pytest.fixture(scope="module")
def history():
    data = generate(SyntheticConfig(n_customers=200, n_terminals=400, n_days=30, seed=3))
    return compute_features(data)


def test_manifest_records_what_was_built(history, tmp_path):
    until = history[schema.TX_TIME].min() + timedelta(days=20)
    idx = FraudIndex.build(history, encoder=None, vector_config=VectorConfig(text_dim=0),
                           until=until)
    version = idx.save("cards", tmp_path)
    directory, manifest = artifacts.resolve(tmp_path, "cards")
    expected = history.filter(pl.col(schema.TX_TIME) + timedelta(days=7) <= until)
    assert manifest["version"] == version == (tmp_path / "cards" / "CURRENT").read_text().strip()
    assert manifest["vector_count"] == expected.height == idx.size
    assert manifest["fraud_count"] == int(expected[schema.IS_FRAUD].sum())
    assert manifest["dimension"] == len(schema.MODEL_FEATURES)
    assert manifest["label_cutoff"] == until.isoformat()
    assert manifest["faiss_index"] == "flat"
    assert {"faiss", "polars", "numpy", "torch"} <= set(manifest["libraries"])
    for rel, meta in manifest["files"].items():
        assert artifacts.sha256_file(directory / rel) == meta["sha256"]
    assert {"index.faiss", "meta.parquet", "context.parquet", "vectorizer.npz"} <= set(
        manifest["files"])


def test_load_gives_identical_search_and_rejects_tampered_files(history, tmp_path):
    idx = FraudIndex.build(history, encoder=None, vector_config=VectorConfig(text_dim=0))
    idx.save("cards", tmp_path)
    loaded = FraudIndex.load("cards", tmp_path)
    queries = idx.vectorizer.transform(history.head(50))
    d1, p1 = idx.search(queries, 5)
    d2, p2 = loaded.search(loaded.vectorizer.transform(history.head(50)), 5)
    assert np.array_equal(p1, p2) and np.allclose(d1, d2)
    # Exact search: each row's nearest neighbour is itself, at distance 0.
    assert (p1[:, 0] == np.arange(50)).all() and np.allclose(d1[:, 0], 0, atol=1e-4)

    meta_file = tmp_path / "cards" / loaded.manifest["version"] / "meta.parquet"
    meta_file.write_bytes(meta_file.read_bytes() + b"x")
    with pytest.raises(artifacts.ArtifactError, match="does not match the manifest"):
        FraudIndex.load("cards", tmp_path)


def test_a_failed_build_leaves_the_previous_version_live(history, tmp_path):
    idx = FraudIndex.build(history, encoder=None, vector_config=VectorConfig(text_dim=0))
    first = idx.save("cards", tmp_path)

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), artifacts.publish(tmp_path, "cards", {"kind": "x"}) as staging:
        (staging / "index.faiss").write_bytes(b"partial")
        raise Boom
    assert artifacts.current_version(tmp_path, "cards") == first
    assert FraudIndex.load("cards", tmp_path).size == idx.size
    assert [p.name for p in (tmp_path / "cards").iterdir() if p.name.startswith(".")] == []


def test_old_versions_are_pruned_but_current_kept(history, tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.KEEP_VERSIONS_ENV, "3")
    idx = FraudIndex.build(history.head(2000), encoder=None,
                           vector_config=VectorConfig(text_dim=0))
    versions = [idx.save("cards", tmp_path) for _ in range(5)]
    kept = sorted(p.name for p in (tmp_path / "cards").iterdir() if p.is_dir())
    assert kept == versions[-3:]


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(artifacts.ArtifactError, match="no artifact named 'nope'"):
        FraudIndex.load("nope", tmp_path)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_find_most_exact_neighbours(history, kind):
    exact = FraudIndex.build(history, encoder=None, vector_config=VectorConfig(text_dim=0),
                             config=IndexConfig(kind="flat"))
    approx = FraudIndex.build(history, encoder=None, vector_config=VectorConfig(text_dim=0),
                              config=IndexConfig(kind=kind, ivf_nprobe=32))
    assert approx.manifest["faiss_index"] == kind
    queries = exact.vectorizer.transform(history.sample(300, seed=1))
    _, p_exact = exact.search(queries, 10)
    _, p_approx = approx.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(p_exact, p_approx, strict=True)])
    assert recall >= 0.9


def test_index_with_text_records_the_encoder_and_refuses_other_weights(history, tmp_path):
    from pipeline.encoder import TextEncoder

    encoder = TextEncoder(device="cpu", cache_dir=tmp_path / "cache")
    idx = FraudIndex.build(history, encoder=encoder, vector_config=VectorConfig(text_dim=4))
    assert idx.vectorizer.use_text_ and idx.manifest["dimension"] == len(schema.MODEL_FEATURES) + 4
    idx.save("cards", tmp_path)
    manifest = json.loads(next((tmp_path / "cards").glob("*/manifest.json")).read_text())
    assert manifest["encoder"]["weights_sha256"] == encoder.weights_hash
    loaded = FraudIndex.load("cards", tmp_path, encoder=encoder)
    assert np.allclose(loaded.vectorizer.transform(history.head(20)),
                       idx.vectorizer.transform(history.head(20)), atol=1e-5)
    encoder._weights_hash = "0" * 64  # stands for an encoder with other weights
    with pytest.raises(artifacts.ArtifactError, match="was built with encoder"):
        FraudIndex.load("cards", tmp_path, encoder=encoder)


def test_gpu_settings_are_kept_and_searches_run_where_they_really_can(history, tmp_path):
    """use_gpu / gpu_float16 go into the manifest; ``gpu`` says where searches really run (never
    on a GPU without one, nor for HNSW, which faiss has no GPU version of), and the scored
    decisions' inputs record that device."""
    from pipeline.index import gpu_available
    from pipeline.scoring import FraudScorer

    cutoff = history[schema.TX_TIME].max() - timedelta(days=3)
    past = history.filter(pl.col(schema.TX_TIME) < cutoff)
    batch = history.filter(pl.col(schema.TX_TIME) >= cutoff).head(200).drop(schema.IS_FRAUD)
    idx = FraudIndex.build(past, encoder=None, vector_config=VectorConfig(text_dim=0),
                           config=IndexConfig(kind="flat", use_gpu=True, gpu_float16=True))
    assert idx.gpu is gpu_available()
    idx.save("cards", tmp_path)
    manifest = artifacts.resolve(tmp_path, "cards")[1]
    assert manifest["index_config"]["gpu_float16"] is True
    assert FraudIndex.load("cards", tmp_path).config.gpu_float16 is True
    assert FraudIndex.load("cards", tmp_path, gpu_float16=False).config.gpu_float16 is False

    devices = {r["search"]["device"] for r in FraudScorer(idx).score(batch, past).inputs}
    assert devices == {"gpu-float16" if gpu_available() else "cpu"}
    if not gpu_available():  # the CPU's exact search, whatever the GPU settings say
        plain = FraudIndex.build(past, encoder=None, vector_config=VectorConfig(text_dim=0),
                                 config=IndexConfig(kind="flat", use_gpu=False))
        queries = plain.vectorizer.transform(batch)
        d1, p1 = idx.search(queries, 10)
        d2, p2 = plain.search(queries, 10)
        assert np.array_equal(p1, p2) and np.array_equal(d1, d2)

    hnsw = FraudIndex.build(past, encoder=None, vector_config=VectorConfig(text_dim=0),
                            config=IndexConfig(kind="hnsw", use_gpu=True))
    assert hnsw.gpu is False


def test_index_build_cli_records_half_precision_for_the_gpu(history, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    path = tmp_path / "history.parquet"
    history.head(3000).write_parquet(path)
    args = ["index", "build", "--input", str(path), "--root", str(tmp_path / "indexes"),
            "--text-dim", "0", "--kind", "flat"]
    for name, flag, expected in (("half", ["--gpu-float16"], True), ("full", [], False)):
        result = CliRunner().invoke(app, [*args, "--name", name, *flag])
        assert result.exit_code == 0, result.output
        manifest = artifacts.resolve(tmp_path / "indexes", name)[1]
        assert manifest["index_config"]["gpu_float16"] is expected


def test_an_index_as_of_a_past_cutoff_keeps_the_history_before_the_cutoff_for_windows():
    """`index build --until` on a file running on past the cutoff (a backtest: index as of
    May 1, score the week after). The feature context used to be the last 37 days of the
    file, weeks after the cutoff, so the week after it was scored with near-empty windows
    (terminal risk 0 for every row, 30-day card counts an eighth of their value)."""
    data = generate(SyntheticConfig(n_customers=60, n_terminals=120, n_days=90, seed=4))
    until = data[schema.TX_TIME].min().replace(hour=0, minute=0, second=0) + timedelta(days=40)
    idx = FraudIndex.build(compute_features(data), encoder=None,
                           vector_config=VectorConfig(text_dim=0), until=until)
    assert idx.context[schema.TX_TIME].min() > until - timedelta(days=37)
    assert idx.context[schema.TX_TIME].min() < until - timedelta(days=36)
    from pipeline.scoring import FraudScorer

    week = (pl.col(schema.TX_TIME) >= until) & (pl.col(schema.TX_TIME) < until + timedelta(days=7))
    got = FraudScorer(idx).features(data.filter(week)).sort(schema.TRANSACTION_ID)
    # What was known at the cutoff: every transaction before it, labels known by then.
    known = data.filter(pl.col(schema.TX_TIME) < until + timedelta(days=7)).with_columns(
        pl.when(pl.col(schema.TX_TIME) + timedelta(days=7) <= until)
        .then(pl.col(schema.IS_FRAUD)).alias(schema.IS_FRAUD))
    want = compute_features(known).filter(week).sort(schema.TRANSACTION_ID)
    assert got.height == want.height > 0
    assert want["TERMINAL_ID_RISK_30DAY_WINDOW"].sum() > 0
    for name in schema.FEATURES:
        assert np.allclose(got[name].to_numpy(), want[name].to_numpy()), name


def test_build_report_names_where_the_index_was_saved_under_the_env_root(history, tmp_path,
                                                                          monkeypatch):
    """With $FINSENTINEL_INDEXES set and no --root, `index build` printed ./indexes/NAME/…,
    a directory that does not exist, instead of where the index went."""
    from pipeline import jobs
    from pipeline.ingest import validate_transactions

    monkeypatch.setenv("FINSENTINEL_INDEXES", str(tmp_path / "shared-indexes"))
    monkeypatch.chdir(tmp_path)
    raw = history.select(*schema.REQUIRED, schema.IS_FRAUD)
    report = jobs.build_index(validate_transactions(raw, require_labels=True), "cards",
                              encoder=None, vector_config=VectorConfig(text_dim=0))
    assert report.path == str(tmp_path / "shared-indexes" / "cards" / report.version)
    assert (tmp_path / "shared-indexes" / "cards" / report.version / "index.faiss").is_file()


def test_index_names_and_versions_cannot_leave_the_root(tmp_path):
    """A name or version from an environment variable (FINSENTINEL_INDEX_NAME) or a ledger
    record (`index_version`) is one folder under the root: `../x` is refused before any file
    outside it is written or read."""
    from pipeline import artifacts

    root = tmp_path / "indexes"
    for bad in ("../outside", "a/b", "..", "", "a\\b"):
        with (pytest.raises(artifacts.ArtifactError, match="expected a plain name"),
              artifacts.publish(root, bad, {})):
            pass
        with pytest.raises(artifacts.ArtifactError, match="expected a plain name"):
            artifacts.resolve(root, bad)
    with artifacts.publish(root, "fraud", {"kind": "test"}) as staging:
        (staging / "x.txt").write_text("x")
    directory, _ = artifacts.resolve(root, "fraud", require=("x.txt",))
    assert directory.parent == root / "fraud"
    with pytest.raises(artifacts.ArtifactError, match="expected a plain name"):
        artifacts.resolve(root, "fraud", "../../elsewhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["indexes"]


def _rehash(directory):
    """The manifest's hashes made to match the files again: what a file swapped in together
    with its hash looks like (another version's file, another faiss's format)."""
    manifest = json.loads((directory / artifacts.MANIFEST).read_text())
    for rel in manifest["files"]:
        manifest["files"][rel]["sha256"] = artifacts.sha256_file(directory / rel)
    (directory / artifacts.MANIFEST).write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def small_index(history):
    return FraudIndex.build(history.head(3000), encoder=None,
                            vector_config=VectorConfig(text_dim=0))


def test_save_returns_its_own_version_when_another_publish_switches_current(small_index,
                                                                            history, tmp_path,
                                                                            monkeypatch):
    """save() read back whatever version CURRENT named after its publish: a second build of
    the same name finishing in between (the daily job and a manual rebuild) made the report
    name the other build's version and the index carry the other build's manifest."""
    other = FraudIndex.build(history.head(1000), encoder=None,
                             vector_config=VectorConfig(text_dim=0))
    real_prune, done = artifacts._prune, []

    def another_build_finishes_first(base, keep):
        if not done:
            done.append(None)  # once: the other build's own publish prunes as usual
            done[0] = other.save("cards", tmp_path)
        real_prune(base, keep)

    monkeypatch.setattr(artifacts, "_prune", another_build_finishes_first)
    version = small_index.save("cards", tmp_path)
    assert version != done[0]
    assert small_index.manifest["version"] == version
    assert small_index.manifest["vector_count"] == small_index.size == 3000
    assert FraudIndex.load("cards", tmp_path, version=version).size == 3000


def test_an_index_config_from_another_version_is_refused_naming_the_manifest(small_index,
                                                                            tmp_path):
    """A manifest written by another finsentinel version: an index_config setting this one does
    not know raised IndexConfig's TypeError, a manifest without one a KeyError."""
    version = small_index.save("cards", tmp_path)
    path = tmp_path / "cards" / version / artifacts.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["index_config"]["hnsw_ef_construction"] = 200
    path.write_text(json.dumps(manifest))
    with pytest.raises(artifacts.ArtifactError,
                       match=rf"{path}.*another finsentinel version.*hnsw_ef_construction"):
        FraudIndex.load("cards", tmp_path)
    del manifest["index_config"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(artifacts.ArtifactError, match=rf"{path}.*index_config"):
        FraudIndex.load("cards", tmp_path)


def test_an_index_file_this_faiss_cannot_read_is_an_artifact_error(small_index, tmp_path):
    """An index.faiss in a format this faiss does not know (written by another faiss) raised
    faiss's RuntimeError ("Index type 0x... not recognized") naming no file."""
    version = small_index.save("cards", tmp_path)
    directory = tmp_path / "cards" / version
    data = (directory / "index.faiss").read_bytes()
    (directory / "index.faiss").write_bytes(b"IwXX" + data[4:])
    _rehash(directory)
    with pytest.raises(artifacts.ArtifactError,
                       match=rf"{directory / 'index.faiss'}.*faiss {faiss.__version__}"):
        FraudIndex.load("cards", tmp_path)


@pytest.mark.parametrize("vectors, dim", [(10, 15), (3000, 7)])
def test_an_index_file_that_does_not_match_its_manifest_is_refused(small_index, tmp_path,
                                                                   vectors, dim):
    """An index.faiss holding other vectors than the manifest and meta.parquet describe loaded
    without a word: 10 vectors searched gave positions 0-9 of 3,000 metadata rows (the wrong
    labels, silently), 7-dimensional ones a bare AssertionError at the first search."""
    version = small_index.save("cards", tmp_path)
    directory = tmp_path / "cards" / version
    swapped = faiss.IndexFlatL2(dim)
    swapped.add(np.random.default_rng(0).normal(size=(vectors, dim)).astype(np.float32))
    faiss.write_index(swapped, str(directory / "index.faiss"))
    _rehash(directory)
    with pytest.raises(artifacts.ArtifactError,
                       match=rf"{directory / 'index.faiss'}: {vectors} vectors of dimension "
                             rf"{dim}.*3000 of dimension 15"):
        FraudIndex.load("cards", tmp_path)


def test_search_checks_its_queries_and_keeps_k_columns(small_index):
    """Query vectors of another dimension raised faiss's bare AssertionError; a NaN query found
    no neighbour at all (scored as the prior, silently); k = 0 raised AssertionError; a k
    beyond the index's size gave fewer columns than k."""
    queries = small_index.vectorizer.transform(small_index.meta.head(4))
    with pytest.raises(ValueError, match=r"dimension 14 .*holds 15-dimensional"):
        small_index.search(queries[:, :14], 5)
    broken = queries.copy()
    broken[2, 3] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        small_index.search(broken, 5)
    with pytest.raises(ValueError, match="row 2"):
        small_index.neighbours(broken, np.full(4, np.iinfo(np.int64).max),
                               np.array(["a", "b", "c", "d"]), 5)
    d, p = small_index.search(queries, 0)
    assert d.shape == p.shape == (4, 0)
    d, p = small_index.search(queries, small_index.size + 2)
    assert p.shape == (4, small_index.size + 2)
    assert (p[:, -2:] == -1).all() and np.isinf(d[:, -2:]).all()
    assert sorted(p[0, :-2].tolist()) == list(range(small_index.size))
