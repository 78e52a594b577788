"""The named scorers and the stacked kNN model: terminal neighbours and left-out neighbours on
hand-made rows, every scorer on synthetic data through the protocol, the stacked index as a
hash-checked artifact without pickle, its explanations in the ledger, and `finsentinel
evaluate`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import schema
from pipeline.artifacts import ArtifactError
from pipeline.evaluation import ProtocolConfig, evaluate, with_day
from pipeline.features import compute_features
from pipeline.index import FraudIndex, IndexConfig
from pipeline.models import SCORERS, make_scorer
from pipeline.stacking import (
    NO_EVENT_DAYS,
    TERMINAL_FEATURES,
    StackingConfig,
    build_stacked_index,
    other_neighbours,
    terminal_evidence,
)
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2018, 5, 1)


def test_terminal_evidence_by_hand():
    labelled = pl.DataFrame({
        schema.TRANSACTION_ID: ["h1", "h2", "h3", "h4"],
        schema.TERMINAL_ID: ["T", "T", "T", "V"],
        schema.TX_TIME: [T0 + timedelta(days=1), T0 + timedelta(days=2),
                         T0 + timedelta(days=3), T0 + timedelta(days=1)],
        schema.IS_FRAUD: [0, 1, 1, 1],
    })
    queries = pl.DataFrame({
        schema.TRANSACTION_ID: ["q10", "q9", "q8", "u"],
        schema.TERMINAL_ID: ["T", "T", "T", "U"],
        schema.TX_TIME: [T0 + timedelta(days=10), T0 + timedelta(days=9, hours=12),
                         T0 + timedelta(days=8, hours=12), T0 + timedelta(days=10)],
    })
    got = terminal_evidence(queries, labelled, delay_days=7).rows(named=True)
    assert [r[schema.TRANSACTION_ID] for r in got] == ["q10", "q9", "q8", "u"]
    # Day 10: all three labels of T are known (days 1-3 + 7 <= 10); the fraud run began day 2.
    assert got[0] == pytest.approx({
        schema.TRANSACTION_ID: "q10", "TERMINAL_LAST_LABEL": 1.0,
        "TERMINAL_FRAUD_SHARE_LAST_3": 2 / 3, "TERMINAL_FRAUD_SHARE_LAST_10": 2 / 3,
        "TERMINAL_DAYS_SINCE_FRAUD": 7.0, "TERMINAL_DAYS_IN_FRAUD_RUN": 8.0,
        "TERMINAL_DAYS_SINCE_LABEL": 7.0}, abs=1e-9)
    # Day 9.5: days 1 and 2 are known.
    assert got[1]["TERMINAL_FRAUD_SHARE_LAST_3"] == pytest.approx(0.5)
    assert got[1]["TERMINAL_DAYS_IN_FRAUD_RUN"] == pytest.approx(7.5)
    # Day 8.5: only the genuine day-1 label: no fraud, no run.
    assert got[2]["TERMINAL_LAST_LABEL"] == 0.0
    assert got[2]["TERMINAL_DAYS_SINCE_FRAUD"] == NO_EVENT_DAYS
    assert got[2]["TERMINAL_DAYS_IN_FRAUD_RUN"] == NO_EVENT_DAYS
    assert got[2]["TERMINAL_DAYS_SINCE_LABEL"] == pytest.approx(7.5)
    # A terminal with no labelled history (V's fraud is another terminal's).
    assert got[3]["TERMINAL_LAST_LABEL"] == 0.0
    assert got[3]["TERMINAL_DAYS_SINCE_LABEL"] == NO_EVENT_DAYS


def test_terminal_evidence_waits_for_a_reviews_label_time():
    """A label given by an analyst's review (label_time) is known from the review on, as the
    index's neighbours use it, not from transaction time + delay; a terminal's later labels
    count only once every earlier one is known, so "the last n labels" never skips one."""
    labelled = pl.DataFrame({
        schema.TRANSACTION_ID: ["h1", "h2"],
        schema.TERMINAL_ID: ["T", "T"],
        schema.TX_TIME: [T0 + timedelta(days=1), T0 + timedelta(days=2)],
        schema.IS_FRAUD: [1, 0],
        # h1 confirmed fraud by a review on day 20; h2 has the usual label (day 2 + 7).
        "label_time": [T0 + timedelta(days=20), None],
    })
    queries = pl.DataFrame({
        schema.TRANSACTION_ID: ["q10", "q21"],
        schema.TERMINAL_ID: ["T", "T"],
        schema.TX_TIME: [T0 + timedelta(days=10), T0 + timedelta(days=21)],
    })
    got = terminal_evidence(queries, labelled, delay_days=7).rows(named=True)
    # Day 10: h1's label is not known yet (review on day 20), and h2 comes after it.
    assert got[0]["TERMINAL_FRAUD_SHARE_LAST_3"] == 0.0
    assert got[0]["TERMINAL_DAYS_SINCE_FRAUD"] == NO_EVENT_DAYS
    assert got[0]["TERMINAL_DAYS_SINCE_LABEL"] == NO_EVENT_DAYS
    # Day 21: both known; the last label is h2's genuine one, the fraud was 20 days before.
    assert got[1] == pytest.approx({
        schema.TRANSACTION_ID: "q21", "TERMINAL_LAST_LABEL": 0.0,
        "TERMINAL_FRAUD_SHARE_LAST_3": 0.5, "TERMINAL_FRAUD_SHARE_LAST_10": 0.5,
        "TERMINAL_DAYS_SINCE_FRAUD": 20.0, "TERMINAL_DAYS_IN_FRAUD_RUN": NO_EVENT_DAYS,
        "TERMINAL_DAYS_SINCE_LABEL": 19.0}, abs=1e-9)
    # Without label times the rule is transaction time + delay, as before.
    plain = terminal_evidence(queries, labelled.drop("label_time"), delay_days=7)
    assert plain["TERMINAL_FRAUD_SHARE_LAST_3"].to_list() == [0.5, 0.5]


def test_other_neighbours_leave_out_same_card_terminal_and_unknown_labels():
    history = pl.DataFrame({
        schema.TRANSACTION_ID: ["a1", "a2", "b1", "c1", "d1"],
        schema.TX_TIME: [T0, T0, T0, T0, T0 + timedelta(days=5)],
        schema.CUSTOMER_ID: ["a", "a", "b", "c", "d"],
        schema.TERMINAL_ID: ["t1", "t2", "t2", "t3", "t4"],
        schema.AMOUNT: [1.0, 2.0, 3.0, 4.0, 1.2],
        schema.IS_FRAUD: [1, 1, 0, 1, 1],
    })
    index = FraudIndex.build(history, encoder=None, config=IndexConfig(kind="flat"),
                             vector_config=VectorConfig(numeric_features=(schema.AMOUNT,),
                                                        log_features=(), text_dim=0))
    query = pl.DataFrame({
        schema.TRANSACTION_ID: ["q"], schema.TX_TIME: [T0 + timedelta(days=10)],
        schema.CUSTOMER_ID: ["a"], schema.TERMINAL_ID: ["t2"], schema.AMOUNT: [1.1]})
    # Card a (a1, a2) and terminal t2 (b1) are left out; d1's label is known only on day 12.
    found = other_neighbours(index, query, k=3, fetch=5, known_by_query_time=True)
    ids = index.meta[schema.TRANSACTION_ID].to_list()
    assert [ids[p] for p in found.positions[0] if p >= 0] == ["c1"]
    assert found.labels[0].tolist() == [1, 0, 0]
    assert np.isinf(found.distances[0, 1:]).all()
    # For the booster's own training rows every indexed label counts.
    training = other_neighbours(index, query, k=3, fetch=5, known_by_query_time=False)
    assert [ids[p] for p in training.positions[0] if p >= 0] == ["d1", "c1"]


@pytest.fixture(scope="module")
def synthetic():
    """Five weeks of synthetic payments (with merchant text) and their features."""
    raw = generate(SyntheticConfig(n_customers=300, n_terminals=600, n_days=35, seed=5))
    return raw, with_day(compute_features(raw))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from pipeline.encoder import TextEncoder

    return TextEncoder(cache_dir=tmp_path_factory.mktemp("embeddings"))


def test_every_scorer_ranks_frauds_through_the_protocol(synthetic, encoder):
    raw, featured = synthetic
    start = featured["_day"].max() - timedelta(days=6)
    config = ProtocolConfig(folds=1, top_k=20)
    folds = {}
    for name in SCORERS:
        report = evaluate(featured, lambda name=name: make_scorer(name, encoder=encoder), start,
                          config)
        fold = folds[name] = report.folds[0]
        base_rate = fold.test_frauds / fold.test_rows
        assert fold.auc_roc > 0.7, (name, fold)
        assert fold.average_precision > 3 * base_rate, (name, fold)
        assert 0 < fold.card_precision_at_k <= 1
    # The learned vector and the stacked evidence rank frauds better than the plain vote.
    assert folds["knn-weighted"].average_precision > folds["knn"].average_precision
    assert folds["knn-stacked"].average_precision > folds["knn"].average_precision


def test_text_scorers_embed_the_merchant_text(synthetic, encoder):
    _, featured = synthetic
    train = featured.head(3000)
    scorer = make_scorer("knn-text", encoder=encoder).fit(train)
    assert scorer.index.vectorizer.use_text_
    assert scorer.index.vectorizer.dimension == len(schema.MODEL_FEATURES) + 8
    assert not make_scorer("knn").fit(train).index.vectorizer.use_text_


def test_scorers_wait_the_protocols_label_delay(synthetic, tmp_path, monkeypatch):
    """``evaluate --delay-days 14``: the kNN scorers' indexes and the stacked model's terminal
    neighbours must wait 14 days for a label, as the protocol and the features do (with the
    default 7 the stacked model used labels the protocol says are not known yet)."""
    from pipeline import evaluation

    for name in ("knn", "knn-text", "knn-weighted", "knn-stacked"):
        assert make_scorer(name).settings.index.label_delay_days == 7
        assert make_scorer(name, label_delay_days=14).settings.index.label_delay_days == 14
    assert make_scorer("knn-stacked", label_delay_days=14).model.config.label_delay_days == 14
    assert make_scorer("knn-stacked").model.config.label_delay_days == 7
    for name in ("logreg", "random-forest", "xgboost"):  # their features carry the delay
        assert make_scorer(name, label_delay_days=14).name == name

    # `finsentinel evaluate` makes its scorers with the protocol's delay.
    import pipeline.models

    made = []

    def recording(name, **kwargs):
        made.append(kwargs.get("label_delay_days"))
        return make_scorer(name, **kwargs)

    raw, _ = synthetic
    raw.write_parquet(tmp_path / "tx.parquet")
    start = raw[schema.TX_TIME].max().date() - timedelta(days=2)
    monkeypatch.setattr(pipeline.models, "make_scorer", recording)
    evaluation.evaluate_file(tmp_path / "tx.parquet", start, "knn", tmp_path / "r.json",
                             evaluation.ProtocolConfig(train_days=3, delay_days=4, test_days=2,
                                                       folds=1))
    assert made and set(made[1:]) == {4}  # the first call only checks the name


def test_unknown_scorer_is_refused():
    with pytest.raises(ValueError, match="unknown scorer 'knn-magic'"):
        make_scorer("knn-magic")


@pytest.fixture(scope="module")
def stacked_index(synthetic, tmp_path_factory):
    raw, _ = synthetic
    cutoff = datetime.combine(raw[schema.TX_TIME].max().date(), datetime.min.time())
    history = compute_features(raw.filter(pl.col(schema.TX_TIME) < cutoff - timedelta(days=7)))
    batch = raw.filter(pl.col(schema.TX_TIME) >= cutoff - timedelta(days=7))
    index = build_stacked_index(history, encoder=None, config=IndexConfig(kind="flat"))
    root = tmp_path_factory.mktemp("indexes")
    index.save("stacked", root)
    return index, root, batch


def test_stacked_model_waits_the_index_label_delay(synthetic, tmp_path):
    """An index built with a 14-day label delay: the stacked model's terminal neighbours use a
    label from transaction time + 14 days on (in training and scoring), not the default 7."""
    raw, _ = synthetic
    cutoff = datetime.combine(raw[schema.TX_TIME].max().date(), datetime.min.time())
    history = compute_features(raw.filter(pl.col(schema.TX_TIME) < cutoff), label_delay_days=14)
    config = IndexConfig(kind="flat", use_gpu=False, label_delay_days=14)
    index = build_stacked_index(history, encoder=None, config=config)
    model = index.model
    assert model.config.label_delay_days == 14
    index.save("late", tmp_path)
    assert FraudIndex.load("late", tmp_path).model.config.label_delay_days == 14
    # The booster's training rows: terminal inputs with 14 days of delay.
    names = list(model.input_names)
    cols = [names.index(n) for n in TERMINAL_FEATURES]
    train = history.filter(pl.col(schema.TX_TIME) > history[schema.TX_TIME].max()
                           - timedelta(days=7))
    x, _ = model.design(train, index, history, training=True)
    want = terminal_evidence(train, history, delay_days=14).select(TERMINAL_FEATURES).to_numpy()
    seven = terminal_evidence(train, history, delay_days=7).select(TERMINAL_FEATURES).to_numpy()
    assert not np.allclose(want, seven)  # the delay matters on these rows
    np.testing.assert_allclose(x[:, cols], want)
    with pytest.raises(ValueError, match="label delay"):
        build_stacked_index(history, encoder=None, config=config,
                            stacking=StackingConfig(label_delay_days=7))


def test_stacked_index_is_saved_as_json_and_hash_checked(stacked_index):
    index, root, batch = stacked_index
    directory = root / "stacked" / index.manifest["version"]
    booster = directory / "booster.json"
    assert json.loads(booster.read_text())["learner"]  # XGBoost's JSON model, not a pickle
    assert {"booster.json", "stacking.json"} <= set(index.manifest["files"])
    assert not any(p.suffix in (".pkl", ".pickle", ".joblib") for p in directory.iterdir())
    loaded = FraudIndex.load("stacked", root)
    featured = compute_features(batch.head(300))
    a = index.model.predict(featured, index, index.meta).scores
    b = loaded.model.predict(featured, loaded, loaded.meta).scores
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert loaded.vectorizer.config.numeric_weights == index.vectorizer.config.numeric_weights
    booster.write_text(booster.read_text().replace('"learner"', '"learner" ', 1))
    with pytest.raises(ArtifactError, match="booster.json"):
        FraudIndex.load("stacked", root)


def test_stacked_scores_and_contributions_in_the_ledger(synthetic, tmp_path):
    from pipeline import jobs
    from pipeline.ingest import read_transactions
    from pipeline.ledger import Ledger

    raw, _ = synthetic
    cutoff = datetime.combine(raw[schema.TX_TIME].max().date(), datetime.min.time())
    history_path, batch_path = tmp_path / "history.parquet", tmp_path / "batch.parquet"
    raw.filter(pl.col(schema.TX_TIME) < cutoff).write_parquet(history_path)
    raw.filter(pl.col(schema.TX_TIME) >= cutoff).drop(
        schema.IS_FRAUD, schema.FRAUD_SCENARIO).write_parquet(batch_path)
    report = jobs.build_index(read_transactions(history_path, require_labels=True), "s",
                              root=tmp_path / "idx", encoder=None,
                              vector_config=VectorConfig(text_dim=0),
                              config=IndexConfig(kind="flat"), scorer="knn-stacked")
    index = FraudIndex.load("s", tmp_path / "idx")
    assert index.model is not None and report.vectors == index.size
    db = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    with Ledger(db) as ledger:
        jobs.score_file(batch_path, index, tmp_path / "scores.parquet", ledger=ledger,
                        history=raw.filter(pl.col(schema.TX_TIME) < cutoff))
        decisions = ledger.decisions()
        assert ledger.verify().ok
    assert decisions
    for d in decisions[:50]:
        e = d["explanation"]
        assert e["method"] == "knn-stacked" and e["neighbours"]
        model = e["model"]
        # Contributions are log-odds: shown ones + the rest + bias give the score back.
        logit = sum(model["contributions_log_odds"].values()) + model["other_inputs_log_odds"] \
            + model["bias_log_odds"]
        assert 1 / (1 + math.exp(-logit)) == pytest.approx(d["score"], abs=1e-4)
        assert set(model["terminal_neighbours"]) >= {"TERMINAL_LAST_LABEL"}
        for n in model["neighbours_other_cards_terminals"]:
            assert n["transaction_id"] in set(index.meta[schema.TRANSACTION_ID])

    # An auditor's replay recomputes the booster's score, not the plain kNN vote behind it.
    from pipeline.audit import replay

    highest = max(decisions, key=lambda d: d["score"])
    with Ledger(db) as ledger:
        for d in [highest, *decisions[:3]]:
            got = replay(ledger, d["decision_id"], root=tmp_path / "idx")
            assert got.ok, got.reason
            assert got.replayed_score == pytest.approx(d["score"], abs=1e-9)
        top = replay(ledger, highest["decision_id"], root=tmp_path / "idx")
    assert top.replayed_score != pytest.approx(highest["explanation"]["knn_score"], abs=1e-3)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600)


def test_cli_evaluate_writes_the_report(synthetic, tmp_path):
    raw, featured = synthetic
    data = tmp_path / "raw.parquet"
    raw.write_parquet(data)
    start = (featured["_day"].max() - timedelta(days=6)).isoformat()
    out = tmp_path / "report.json"
    result = _cli("evaluate", "--data", str(data), "--test-start", start, "--folds", "1",
                  "--scorer", "logreg", "--output", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["scorer"] == "logreg"
    assert report["settings"]["test_start"] == start
    assert report["settings"]["rows_accepted"] == raw.height
    assert report["settings"]["protocol"]["delay_days"] == 7
    assert len(report["folds"]) == 1 and report["folds"][0]["test_start"] == start
    assert report["summary"]["auc_roc"]["mean"] == report["folds"][0]["auc_roc"] > 0.75
    assert "logreg: AUC ROC" in result.stdout

    too_early = _cli("evaluate", "--data", str(data), "--test-start", "2018-04-05", "--scorer",
                     "logreg", "--output", str(tmp_path / "x.json"))
    assert too_early.returncode == 2 and "Traceback" not in too_early.stderr
    assert "fold 0 needs data from" in too_early.stderr


def test_evaluate_flow_matches_the_library(synthetic, prefect_harness, tmp_path):
    from flows.evaluate import evaluate_scorer

    raw, featured = synthetic
    data = tmp_path / "raw.parquet"
    raw.write_parquet(data)
    start = featured["_day"].max() - timedelta(days=6)
    out = tmp_path / "flow.json"
    got = evaluate_scorer(str(data), start.isoformat(), str(out), scorer="logreg", folds=1)
    direct = evaluate(featured, lambda: make_scorer("logreg"), start, ProtocolConfig(folds=1))
    assert json.loads(out.read_text())["summary"] == got["summary"]
    for metric in ("auc_roc", "average_precision", "card_precision_at_k"):
        assert got["folds"][0][metric] == pytest.approx(getattr(direct.folds[0], metric))
    assert got["settings"]["data_sha256"] and got["settings"]["scorer"] == "logreg"


# --- the vectorizer and the stacked model: regressions ------------------------------------------


class _HashEncoder:
    """A deterministic stand-in for the sentence encoder: a unit vector from each text's hash."""

    def encode(self, texts):
        import hashlib

        out = np.zeros((len(texts), 16), dtype=np.float32)
        for i, text in enumerate(texts):
            v = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], dtype=np.uint8)
            out[i] = v / np.linalg.norm(v.astype(np.float64))
        return out


def _text_vectorizer():
    from pipeline.vectors import TransactionVectorizer

    fit = pl.DataFrame({schema.AMOUNT: [1.0, 2.0, 3.0, 4.0],
                        schema.MERCHANT_NAME: ["Ann", "Bob", "Cat", "Dan"],
                        schema.CHANNEL: ["card-present", "card-not-present"] * 2})
    config = VectorConfig(numeric_features=(schema.AMOUNT,), log_features=(schema.AMOUNT,),
                          text_dim=2)
    return TransactionVectorizer(config, _HashEncoder()).fit(fit)


def test_vectorizer_with_text_transforms_a_batch_without_text_columns():
    """An index fitted with merchant text scoring a batch that has none of the descriptive
    columns: every row gets the empty text's vector (a one-row literal made the text part a
    single row, and a batch of more than one row failed to stack)."""
    vectorizer = _text_vectorizer()
    batch = pl.DataFrame({schema.AMOUNT: [1.0, 2.5, 9.0]})
    vectors = vectorizer.transform(batch)
    assert vectors.shape == (3, vectorizer.dimension)
    for row in range(3):  # the same vector as the row alone (an audit replays one row)
        np.testing.assert_array_equal(vectors[row], vectorizer.transform(batch[row:row + 1])[0])
    np.testing.assert_array_equal(vectors[0, 1:], vectors[2, 1:])
    assert vectorizer.transform(batch.head(0)).shape == (0, vectorizer.dimension)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_vectorizer_refuses_missing_or_non_finite_features(bad):
    """A null, NaN or infinite feature made the fitted mean NaN (every vector of the index NaN)
    or a query vector non-finite (its neighbours meaningless): refused, naming the column."""
    from pipeline.vectors import TransactionVectorizer

    config = VectorConfig(numeric_features=(schema.AMOUNT, "X"), log_features=(schema.AMOUNT,),
                          text_dim=0)
    good = pl.DataFrame({schema.AMOUNT: [1.0, 2.0, 3.0], "X": [0.5, 0.25, 1.0]})
    broken = good.with_columns(pl.Series("X", [0.5, bad, 1.0], dtype=pl.Float64))
    with pytest.raises(ValueError, match="'X'"):
        TransactionVectorizer(config).fit(broken)
    vectorizer = TransactionVectorizer(config).fit(good)
    with pytest.raises(ValueError, match="'X'"):
        vectorizer.transform(broken)
    assert np.isfinite(vectorizer.transform(good)).all()


@pytest.mark.parametrize("weights", [{schema.AMOUNT: -1.0}, {schema.AMOUNT: float("nan")},
                                     {schema.AMOUNT: float("inf")}, {"AMOUNTT": 2.0}])
def test_vector_config_refuses_bad_feature_weights(weights):
    """A NaN or infinite weight made every vector non-finite, a negative one is no weight of a
    distance, and a weight for a feature the vector lacks (a typo) was silently ignored."""
    with pytest.raises(ValueError, match="weight"):
        VectorConfig(numeric_features=(schema.AMOUNT,), numeric_weights=weights)
    with pytest.raises(ValueError, match="text_weight"):
        VectorConfig(text_weight=float("nan"))
    with pytest.raises(ValueError, match="text_dim"):
        VectorConfig(text_dim=-1)
    zero = VectorConfig(numeric_features=(schema.AMOUNT,), numeric_weights={schema.AMOUNT: 0.0})
    assert zero.numeric_weights == {schema.AMOUNT: 0.0}


def test_stacked_model_refuses_a_window_with_one_class():
    """Trained directly (the knn-stacked scorer of `evaluate` does) on a window with no fraud,
    the booster learned a constant and every decision got the same score: refused as
    build_stacked_index refuses it."""
    from pipeline.stacking import StackedModel

    frame = pl.DataFrame({schema.TRANSACTION_ID: ["a", "b"], schema.IS_FRAUD: [0, 0]})
    with pytest.raises(ValueError, match="both classes"):
        StackedModel().fit(frame, index=None, labelled=frame)


def test_a_booster_of_another_input_layout_is_refused_when_loaded(stacked_index, tmp_path):
    """stacking.json's inputs were checked against this version's, but not the booster that
    consumes them: one with two inputs more (saved without names) loaded and scored every row
    silently, the missing inputs read as absent; one with the inputs in another order loaded
    and failed only at the first decision."""
    import shutil

    import xgboost

    from pipeline.stacking import BOOSTER_FILE, StackedModel

    index, root, batch = stacked_index
    directory = tmp_path / "model"
    shutil.copytree(root / "stacked" / index.manifest["version"], directory)
    names = list(index.model.input_names)
    rng = np.random.default_rng(0)

    def save_booster(columns: int, feature_names: list[str] | None) -> None:
        x = rng.normal(size=(200, columns))
        model = xgboost.XGBClassifier(n_estimators=3, max_depth=2, verbosity=0)
        booster = model.fit(x, (x[:, 0] > 0).astype(int)).get_booster()
        booster.feature_names = feature_names
        booster.save_model(str(directory / BOOSTER_FILE))

    save_booster(len(names) + 2, None)
    with pytest.raises(ValueError, match=f"{BOOSTER_FILE}.*{len(names) + 2} inputs"):
        StackedModel.load(directory)
    save_booster(len(names), names[::-1])
    with pytest.raises(ValueError, match=f"{BOOSTER_FILE}.*inputs"):
        StackedModel.load(directory)
    save_booster(len(names), names)  # this layout: loads and scores
    loaded = StackedModel.load(directory)
    featured = compute_features(batch.head(50))
    assert loaded.predict(featured, index, index.meta, contributions=False).scores.shape == (50,)
