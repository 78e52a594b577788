"""The handbook's evaluation protocol on hand-made examples: AP and Card Precision@k with known
values, the fold split and the removal of known-compromised cards, and the fold loop."""

from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from pipeline import schema
from pipeline.evaluation import (
    ProtocolConfig,
    evaluate,
    fold_test_starts,
    parse_day,
    split_fold,
)
from pipeline.metrics import average_precision, card_precision_at_k


def test_average_precision_by_hand():
    # Ranked: fraud, genuine, fraud, genuine -> precision at each fraud 1/1 and 2/3.
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.2])
    assert average_precision(labels, scores) == pytest.approx((1 + 2 / 3) / 2)


def _cp_example():
    """Three days, k = 2. Rows: (day, card, label, score)."""
    rows = [
        # Day 1. Card A: a genuine high score and a fraud low score -> card score 0.9, label 1.
        (1, "A", 0, 0.9), (1, "A", 1, 0.1), (1, "B", 0, 0.8), (1, "C", 1, 0.7), (1, "D", 0, 0.2),
        # Day 2. A was caught on day 1 and is left out: the top 2 become C (fraud) and B.
        (2, "A", 1, 0.95), (2, "C", 1, 0.9), (2, "B", 0, 0.8),
        # Day 3. One card only: precision is still over k = 2.
        (3, "F", 1, 0.3),
    ]
    day, card, label, score = (np.array(c) for c in zip(*rows, strict=True))
    return day, card, label, score


def test_card_precision_at_k_by_hand():
    day, card, label, score = _cp_example()
    mean, per_day = card_precision_at_k(day, card, label, score, k=2)
    # Day 1: top A (fraud), B -> 1/2. Day 2 without A: C (fraud), B -> 1/2. Day 3: F -> 1/2.
    assert per_day == [0.5, 0.5, 0.5]
    assert mean == pytest.approx(0.5)
    # Without removing caught cards, day 2's top 2 are A and C, both compromised.
    mean_kept, per_day_kept = card_precision_at_k(day, card, label, score, k=2,
                                                  remove_detected=False)
    assert per_day_kept == [0.5, 1.0, 0.5]
    assert mean_kept == pytest.approx(2 / 3)


def test_card_precision_does_not_depend_on_row_order():
    day, card, label, score = _cp_example()
    order = np.random.default_rng(3).permutation(len(day))
    assert card_precision_at_k(day[order], card[order], label[order], score[order], k=2) == \
        card_precision_at_k(day, card, label, score, k=2)


def test_card_precision_rejects_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        card_precision_at_k(np.array([1]), np.array(["a"]), np.array([1]), np.array([0.1]), k=0)
    with pytest.raises(ValueError, match="same length"):
        card_precision_at_k(np.array([1, 2]), np.array(["a"]), np.array([1]), np.array([0.1]))


def _frame(rows: list[tuple[str, date, int]]) -> pl.DataFrame:
    """Transactions (card, day, is_fraud), one per row, at noon."""
    return pl.DataFrame({
        schema.TRANSACTION_ID: [str(i) for i in range(len(rows))],
        schema.TX_TIME: [datetime.combine(d, datetime.min.time()) + timedelta(hours=12)
                         for _, d, _ in rows],
        schema.CUSTOMER_ID: [c for c, _, _ in rows],
        schema.TERMINAL_ID: ["t"] * len(rows),
        schema.AMOUNT: [10.0 + i for i in range(len(rows))],
        schema.IS_FRAUD: [f for _, _, f in rows],
    }, schema_overrides={schema.IS_FRAUD: pl.Int8})


JAN = [date(2018, 1, d) for d in range(1, 11)]


def _protocol_frame() -> pl.DataFrame:
    """Train Jan 1-2, delay Jan 3-4, test Jan 5-7 (train 2, delay 2, test 3 days)."""
    rows = [
        ("f", date(2017, 12, 31), 1),  # fraud before the training period: not known
        ("a", JAN[0], 1),              # fraud in training: known on every test day
        ("e", JAN[1], 0),
        ("b", JAN[2], 1),              # fraud on delay day 1 (Jan 3): known from Jan 6
        ("c", JAN[3], 1),              # fraud on delay day 2 (Jan 4): known from Jan 7
        ("d", JAN[4], 1),              # fraud in the test week: never removed
    ]
    for card in "abcdef":
        for day in JAN[4:7]:
            rows.append((card, day, 0))
    rows.append(("e", JAN[7], 1))      # after the test week: outside the fold
    return _frame(rows)


def test_split_removes_known_compromised_cards_day_by_day():
    config = ProtocolConfig(train_days=2, delay_days=2, test_days=3, folds=1)
    split = split_fold(_protocol_frame(), JAN[4], config, check_coverage=False)
    assert (split.train_start, split.train_end) == (JAN[0], JAN[2])
    assert (split.test_start, split.test_end) == (JAN[4], JAN[7])
    assert sorted(split.train[schema.CUSTOMER_ID].to_list()) == ["a", "e"]
    kept = sorted((c, d.day) for c, d in split.test.select(
        schema.CUSTOMER_ID, pl.col(schema.TX_TIME).dt.date()).iter_rows())
    expected = sorted(
        [("b", 5), ("c", 5), ("c", 6)]
        + [(card, day) for card in "def" for day in (5, 6, 7)]
        + [("d", 5)]  # d's own fraud row on Jan 5
    )
    assert kept == expected
    assert split.cards_removed == 3  # a (all days), b (Jan 6-7), c (Jan 7)
    assert split.test_rows_removed == 3 + 2 + 1


def test_folds_step_back_by_the_test_period_and_coverage_is_checked():
    config = ProtocolConfig(folds=4)
    assert fold_test_starts(date(2018, 7, 25), config) == [
        date(2018, 7, 25), date(2018, 7, 18), date(2018, 7, 11), date(2018, 7, 4)]
    frame = _protocol_frame()
    with pytest.raises(ValueError, match="fold 0 needs data from 2017-12-22"):
        split_fold(frame, JAN[4], ProtocolConfig())
    short = ProtocolConfig(train_days=2, delay_days=2, test_days=3, folds=2)
    with pytest.raises(ValueError, match="fold 1 needs data"):
        evaluate(frame, lambda: _Recorder(), JAN[4], short)


class _Recorder:
    """Scores by amount and remembers what it was given."""

    name = "recorder"

    def fit(self, train: pl.DataFrame, history: pl.DataFrame | None = None):
        self.train, self.history = train, history
        return self

    def score(self, test: pl.DataFrame, history: pl.DataFrame | None = None) -> np.ndarray:
        self.test = test
        return test[schema.AMOUNT].to_numpy()


def test_evaluate_fits_each_fold_on_its_own_training_rows():
    rng = np.random.default_rng(0)
    rows = [(f"c{rng.integers(40)}", JAN[0] + timedelta(days=int(d)), int(rng.random() < 0.2))
            for d in rng.integers(0, 21, size=600)]
    frame = _frame(rows)
    scorers: list[_Recorder] = []

    def make():
        scorers.append(_Recorder())
        return scorers[-1]

    config = ProtocolConfig(train_days=3, delay_days=2, test_days=2, folds=3, top_k=5)
    test_start = JAN[0] + timedelta(days=14)
    report = evaluate(frame, make, test_start, config)
    assert [f.test_start for f in report.folds] == ["2018-01-15", "2018-01-13", "2018-01-11"]
    for fold, scorer in zip(report.folds, scorers, strict=True):
        train_days = scorer.train[schema.TX_TIME].dt.date()
        assert train_days.min() >= date.fromisoformat(fold.train_start)
        assert train_days.max() < date.fromisoformat(fold.train_end)
        assert (date.fromisoformat(fold.train_end) - date.fromisoformat(fold.train_start)).days \
            == 3
        assert scorer.test.height == fold.test_rows
        # The evidence a scorer may consult ends before the last test day minus the delay:
        # no test row's label is in it.
        last_known = date.fromisoformat(fold.test_end) - timedelta(days=2)
        assert scorer.history[schema.TX_TIME].dt.date().max() < last_known
        assert not set(scorer.history[schema.TRANSACTION_ID]) & set(scorer.test[
            schema.TRANSACTION_ID])
        labels = scorer.test[schema.IS_FRAUD].to_numpy()
        assert fold.average_precision == pytest.approx(
            average_precision(labels, scorer.test[schema.AMOUNT].to_numpy()))
    values = [f.average_precision for f in report.folds]
    assert report.summary["average_precision"]["mean"] == pytest.approx(np.mean(values))
    assert report.summary["average_precision"]["std"] == pytest.approx(np.std(values))
    assert report.settings["protocol"]["folds"] == 3


def test_parse_day():
    assert parse_day("2018-07-25") == date(2018, 7, 25)
    assert parse_day(datetime(2018, 7, 25)) == date(2018, 7, 25)
    with pytest.raises(ValueError, match="must be a day"):
        parse_day(datetime(2018, 7, 25, 12))
    with pytest.raises(ValueError, match="expected a day"):
        parse_day("25/07/2018")


def test_the_reports_command_line_reproduces_the_report(tmp_path):
    """The JSON report's ``settings.command`` is how an auditor re-runs an evaluation: run as
    written (a shell's word splitting), it gives the same protocol and the same numbers."""
    import json
    import shlex

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.evaluation import evaluate_file
    from pipeline.synthetic import SyntheticConfig, generate

    work = tmp_path / "model risk"  # a space in the path
    work.mkdir()
    data = work / "tx.parquet"
    generate(SyntheticConfig(n_customers=150, n_terminals=300, n_days=20, seed=2,
                             start_date=date(2018, 1, 20))).write_parquet(data)
    config = ProtocolConfig(train_days=3, delay_days=2, test_days=3, folds=2, top_k=5)
    first = evaluate_file(data, "2018-02-05", "logreg", work / "first.json", config)
    command = first.settings["command"]
    argv = shlex.split(command)
    assert argv[:2] == ["finsentinel", "evaluate"]
    rerun = work / "first.json"  # the command names the first report's output
    rerun.unlink()
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, result.output
    again = json.loads(rerun.read_text())
    assert again["settings"]["protocol"] == first.settings["protocol"] == {
        "train_days": 3, "delay_days": 2, "test_days": 3, "folds": 2, "top_k": 5}
    assert [f["test_start"] for f in again["folds"]] == ["2018-02-05", "2018-02-02"]
    assert again["summary"]["average_precision"] == first.summary["average_precision"]
    assert again["settings"]["command"] == command


def test_a_fold_without_fraud_is_reported_as_valid_json(tmp_path):
    """A test period without fraud has no AUC ROC or AP (undefined, not 0.5 or 0): the report
    says null, in JSON that strict parsers (jq, JavaScript, jsonb) read, not NaN."""
    import json

    from pipeline.evaluation import write_report

    rows = [(c, JAN[d], int(c == "a" and d == 0)) for c in "abcd" for d in range(4)]
    config = ProtocolConfig(train_days=2, delay_days=0, test_days=2, folds=1, top_k=2)
    report = evaluate(_frame(rows), lambda: _Recorder(), JAN[2], config)
    fold = report.folds[0]
    assert (fold.test_frauds, fold.card_precision_at_k) == (0, 0.0)
    assert np.isnan(fold.auc_roc) and np.isnan(fold.average_precision)

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    written = json.loads(write_report(report, tmp_path / "r.json").read_text(),
                         parse_constant=refuse)
    assert written["folds"][0]["auc_roc"] is None
    assert written["folds"][0]["average_precision"] is None
    assert written["folds"][0]["card_precision_at_k"] == 0.0
    assert written["summary"]["auc_roc"] == {"mean": None, "std": None}
    assert written["summary"]["card_precision_at_k"] == {"mean": 0.0, "std": 0.0}


class _Constant(_Recorder):
    """Returns whatever score array it is given (to check what the protocol accepts)."""

    name = "constant"

    def __init__(self, value: float):
        self.value = value

    def score(self, test: pl.DataFrame, history: pl.DataFrame | None = None) -> np.ndarray:
        return np.full(test.height, self.value)


def test_a_fold_whose_training_days_hold_no_fraud_is_refused_by_name():
    """A training period of one class cannot train a classifier: logreg raised scikit-learn's
    bare 'needs samples of at least 2 classes', random-forest crashed with an IndexError and the
    kNN scorers reported a constant score's AUC 0.5 as if it were a result. The protocol says
    which fold and which days, before fitting anything."""
    rows = [(c, JAN[d], int(c == "a" and d in (6, 7))) for c in "abcd" for d in range(10)]
    config = ProtocolConfig(train_days=2, delay_days=2, test_days=2, folds=2, top_k=2)
    made: list[_Recorder] = []

    def make():
        made.append(_Recorder())
        return made[-1]

    # Fold 0 trains on Jan 3-4 (no fraud), fold 1 on Jan 1-2 (no fraud either).
    with pytest.raises(ValueError, match=r"fold 0: the training days 2018-01-03 to 2018-01-04 "
                                         r"hold no fraud"):
        evaluate(_frame(rows), make, JAN[6], config)
    assert made == []  # refused before any scorer was fitted


def test_non_finite_scores_are_refused_with_the_scorers_name():
    rows = [(c, JAN[d], int(c == "a" and d in (0, 4))) for c in "abcd" for d in range(6)]
    config = ProtocolConfig(train_days=2, delay_days=0, test_days=2, folds=1, top_k=2)
    with pytest.raises(ValueError, match=r"scorer 'constant' returned 6 non-finite scores"):
        evaluate(_frame(rows), lambda: _Constant(float("nan")), JAN[2], config)


def test_coverage_errors_say_which_way_to_move_the_test_start():
    frame = _frame([(c, JAN[0] + timedelta(days=d), 0) for c in "ab" for d in range(30)])
    config = ProtocolConfig(folds=2)  # needs 7 + 7 + 7 + 7 days: test starts 2018-01-22..24
    with pytest.raises(ValueError, match=r"test days run past the data's last day 2018-01-30.*"
                                         r"an earlier --test-start \(2018-01-24 at the latest\)"):
        split_fold(frame, date(2018, 1, 25), config)
    with pytest.raises(ValueError, match=r"a later --test-start \(2018-01-22 at the earliest "
                                         r"with 2 folds\) or fewer --folds"):
        evaluate(frame, lambda: _Recorder(), date(2018, 1, 21), config)
    short = frame.filter(pl.col(schema.TX_TIME) < datetime(2018, 1, 20))
    with pytest.raises(ValueError, match=r"2018-01-01 to 2018-01-19 \(19 days\).*need at least "
                                         r"28 days"):
        evaluate(short, lambda: _Recorder(), date(2018, 1, 15), config)


def test_unlabelled_rows_count_in_the_features_but_are_not_evaluated(tmp_path):
    """Transactions whose label is not known yet are still transactions: they count in the
    card's and the terminal's windows (as when scoring in production), and only the labelled
    rows are trained and tested on. They used to be quarantined before the features were
    computed, so every other row of their card and terminal got different features."""
    from pipeline.evaluation import load_featured

    rows = [(c, JAN[d], int(c == "a" and d == 1)) for c in "abc" for d in range(4)]
    frame = _frame(rows).with_columns(
        pl.when(pl.col(schema.TRANSACTION_ID) == "1").then(None)
        .otherwise(pl.col(schema.IS_FRAUD)).alias(schema.IS_FRAUD))  # card a, Jan 2
    frame = pl.concat([frame, _frame([("a", JAN[1], 0)]).with_columns(
        pl.col(schema.TRANSACTION_ID).replace("0", "late"),
        pl.col(schema.TX_TIME) + timedelta(hours=1))])
    frame.write_parquet(tmp_path / "tx.parquet")
    featured, record = load_featured(tmp_path / "tx.parquet", 7)
    assert featured[schema.IS_FRAUD].null_count() == 0
    assert "1" not in featured[schema.TRANSACTION_ID].to_list()
    late = featured.filter(pl.col(schema.TRANSACTION_ID) == "late")
    assert late["CUSTOMER_ID_NB_TX_1DAY_WINDOW"].item() == 2  # its own and the unlabelled one
    assert (record["rows_in"], record["rows_unlabelled"], record["rows_quarantined"],
            record["rows_accepted"]) == (13, 1, 0, 12)


def test_the_settings_record_the_versions_and_the_threads(tmp_path):
    import sklearn
    import xgboost

    import pipeline
    from pipeline.evaluation import evaluate_file
    from pipeline.synthetic import SyntheticConfig, generate

    data = tmp_path / "tx.parquet"
    generate(SyntheticConfig(n_customers=150, n_terminals=300, n_days=20, seed=2,
                             start_date=date(2018, 1, 20))).write_parquet(data)
    config = ProtocolConfig(train_days=3, delay_days=2, test_days=3, folds=1, top_k=5)
    report = evaluate_file(data, "2018-02-05", "logreg", tmp_path / "r.json", config, n_jobs=2)
    versions = report.settings["versions"]
    assert versions["finsentinel"] == pipeline.__version__
    assert versions["scikit-learn"] == sklearn.__version__
    assert versions["xgboost"] == xgboost.__version__
    assert report.settings["command"].endswith("--jobs 2")


def test_the_command_shows_each_folds_last_test_day_and_the_rows_left_out(tmp_path):
    """The fold line named the exclusive end (the day after the last test day) as if it were a
    test day; rows read but not evaluated (no label, quarantined) went unmentioned."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.synthetic import SyntheticConfig, generate

    data = tmp_path / "tx.parquet"
    frame = generate(SyntheticConfig(n_customers=150, n_terminals=300, n_days=20, seed=2,
                                     start_date=date(2018, 1, 20)))
    frame = frame.with_columns(pl.when(pl.int_range(pl.len()) % 40 == 0).then(None)
                               .otherwise(pl.col(schema.IS_FRAUD)).alias(schema.IS_FRAUD))
    unlabelled = frame[schema.IS_FRAUD].null_count()
    frame.write_parquet(data)
    result = CliRunner().invoke(app, [
        "evaluate", "--data", str(data), "--test-start", "2018-02-05", "--folds", "1",
        "--scorer", "logreg", "--train-days", "3", "--delay-days", "2", "--test-days", "3",
        "--top-k", "5", "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "fold 0: test 2018-02-05 to 2018-02-07 " in result.output
    assert f"{unlabelled:,} rows without a label" in result.output
