"""The handbook's features: against the handbook's own values, a pandas rolling reference written
here, and a small example worked out by hand."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from pipeline.features import compute_batch_features, compute_features, feature_names
from pipeline.schema import (
    ALIASES,
    AMOUNT,
    CUSTOMER_ID,
    DTYPES,
    FEATURES,
    IS_FRAUD,
    TERMINAL_ID,
    TRANSACTION_ID,
    TX_TIME,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HANDBOOK = SHARED_DATA / "fraud-handbook"
RAW = HANDBOOK / "raw-2018-04-01_2018-07-31.parquet"
SAMPLE = HANDBOOK / "transformed-sample-100k-2018-04-01_2018-07-31.parquet"


def frame(rows: list[tuple], fraud: bool = True) -> pl.DataFrame:
    """Canonical transactions from (id, time, customer, terminal, amount[, is_fraud]) tuples."""
    columns = [TRANSACTION_ID, TX_TIME, CUSTOMER_ID, TERMINAL_ID, AMOUNT]
    columns += [IS_FRAUD] if fraud else []
    return pl.DataFrame(rows, schema={c: DTYPES[c] for c in columns}, orient="row")


def synthetic(seed: int, n: int = 1500) -> pl.DataFrame:
    """Random transactions on an hourly grid over 60 days: many rows share a customer and a
    time, and many pairs are exactly 1, 7, 8, 14 or 37 days apart, so ties and window edges are
    hit often. Ids are equally wide and unrelated to time or row order."""
    rng = np.random.default_rng(seed)
    start = datetime(2018, 4, 1)
    return pl.DataFrame(
        {
            TRANSACTION_ID: [f"tx{i:05d}" for i in rng.permutation(n)],
            TX_TIME: [start + timedelta(hours=int(h)) for h in rng.integers(0, 60 * 24, n)],
            CUSTOMER_ID: [f"c{i}" for i in rng.integers(0, 25, n)],
            TERMINAL_ID: [f"t{i}" for i in rng.integers(0, 12, n)],
            AMOUNT: np.round(rng.gamma(2.0, 30.0, n), 2),
            IS_FRAUD: (rng.random(n) < 0.2).astype(np.int8),
        },
        schema_overrides={TX_TIME: pl.Datetime("us")},
    )


def pandas_reference(
    transactions: pl.DataFrame, delay: int = 7, windows: tuple[int, ...] = (1, 7, 30)
) -> pl.DataFrame:
    """The handbook's own feature code (pandas time-based rolling per customer and terminal),
    with ties in time put in transaction id order. Ids in the tests are equally wide. A label
    not known (null) counts among a terminal's transactions, not in its fraud share."""
    df = transactions.to_pandas()
    if IS_FRAUD not in df:
        df[IS_FRAUD] = np.nan
    df["_labelled"] = df[IS_FRAUD].notna().astype("float64")
    df[IS_FRAUD] = df[IS_FRAUD].fillna(0).astype("int64")
    df = df.sort_values([TX_TIME, TRANSACTION_ID], kind="stable").reset_index(drop=True)
    out = pd.DataFrame({TRANSACTION_ID: df[TRANSACTION_ID]})
    out["TX_DURING_WEEKEND"] = (df[TX_TIME].dt.weekday >= 5).astype(float)
    out["TX_DURING_NIGHT"] = (df[TX_TIME].dt.hour <= 6).astype(float)
    for _, group in df.groupby(CUSTOMER_ID):
        amounts = group.set_index(TX_TIME)[AMOUNT]
        for n in windows:
            total = amounts.rolling(f"{n}D").sum().to_numpy()
            count = amounts.rolling(f"{n}D").count().to_numpy()
            out.loc[group.index, f"CUSTOMER_ID_NB_TX_{n}DAY_WINDOW"] = count
            out.loc[group.index, f"CUSTOMER_ID_AVG_AMOUNT_{n}DAY_WINDOW"] = total / count
    for _, group in df.groupby(TERMINAL_ID):
        fraud = group.set_index(TX_TIME)[IS_FRAUD]
        labelled = group.set_index(TX_TIME)["_labelled"]
        nb_fraud_delay = fraud.rolling(f"{delay}D").sum().to_numpy()
        nb_tx_delay = fraud.rolling(f"{delay}D").count().to_numpy()
        nb_labelled_delay = labelled.rolling(f"{delay}D").sum().to_numpy()
        for n in windows:
            nb_fraud = fraud.rolling(f"{delay + n}D").sum().to_numpy() - nb_fraud_delay
            nb_tx = fraud.rolling(f"{delay + n}D").count().to_numpy() - nb_tx_delay
            nb_labelled = (labelled.rolling(f"{delay + n}D").sum().to_numpy()
                           - nb_labelled_delay)
            with np.errstate(invalid="ignore", divide="ignore"):
                risk = np.where(nb_labelled > 0, nb_fraud / nb_labelled, 0.0)
            out.loc[group.index, f"TERMINAL_ID_NB_TX_{n}DAY_WINDOW"] = nb_tx
            out.loc[group.index, f"TERMINAL_ID_RISK_{n}DAY_WINDOW"] = risk
    return pl.from_pandas(out)


def assert_features_close(
    ours: pl.DataFrame, expected: pl.DataFrame, names=FEATURES, tol: float = 1e-9
) -> None:
    """Same ids, and every feature within `tol` of the expected value."""
    joined = expected.join(ours, on=TRANSACTION_ID, how="left", suffix="_ours")
    assert joined.height == expected.height == ours.height
    for name in names:
        diff = (joined[name] - joined[f"{name}_ours"]).abs()
        assert diff.null_count() == 0, f"{name}: rows missing"
        assert diff.max() <= tol, f"{name}: max abs difference {diff.max()}"


# --- the handbook's own values ------------------------------------------------------------


@pytest.mark.shared_data
def test_reproduces_the_handbooks_feature_values() -> None:
    if not (RAW.exists() and SAMPLE.exists()):
        pytest.skip(f"fraud-handbook data not found under {HANDBOOK} (../shared/data is absent)")
    raw = pl.read_parquet(RAW)
    canonical = raw.rename({c: ALIASES[c.lower()] for c in raw.columns if c.lower() in ALIASES})
    canonical = canonical.with_columns(
        pl.col(c).cast(DTYPES[c]) for c in canonical.columns if c in DTYPES
    )
    started = time.perf_counter()
    ours = compute_features(canonical)
    elapsed = time.perf_counter() - started
    assert elapsed < 30, f"{canonical.height} rows took {elapsed:.1f} s"
    assert ours.height == raw.height
    assert ours[TRANSACTION_ID].equals(canonical[TRANSACTION_ID])  # input order kept

    sample = pl.read_parquet(SAMPLE).with_columns(pl.col("TRANSACTION_ID").cast(pl.String))
    joined = sample.join(ours, left_on="TRANSACTION_ID", right_on=TRANSACTION_ID, suffix="_ours")
    assert joined.height == sample.height == 100_000
    for name in FEATURES:
        assert ours[name].null_count() == 0, f"{name}: nulls"
        diff = (joined[name].cast(pl.Float64) - joined[f"{name}_ours"]).abs().max()
        assert diff <= 1e-6, f"{name}: max abs difference {diff} from the handbook"

    # The sample holds rows whose customer has another transaction at the very same second:
    # the handbook leaves the later-sorted one out of the earlier one's window.
    tied = canonical.filter(pl.len().over(CUSTOMER_ID, TX_TIME) > 1)[TRANSACTION_ID]
    assert joined.filter(pl.col("TRANSACTION_ID").is_in(tied.implode())).height >= 1


# --- a pandas rolling reference -----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pandas_rolling_reference(seed: int) -> None:
    transactions = synthetic(seed)
    assert transactions.filter(pl.len().over(CUSTOMER_ID, TX_TIME) > 1).height > 0  # ties
    assert_features_close(compute_features(transactions), pandas_reference(transactions))


def test_other_windows_and_label_delay_match_reference() -> None:
    transactions = synthetic(3)
    ours = compute_features(transactions, label_delay_days=3, windows_days=(2, 14))
    names = feature_names((2, 14))
    assert names[2:4] == ("CUSTOMER_ID_NB_TX_2DAY_WINDOW", "CUSTOMER_ID_AVG_AMOUNT_2DAY_WINDOW")
    assert set(names) <= set(ours.columns)
    assert_features_close(ours, pandas_reference(transactions, 3, (2, 14)), names)


def test_default_names_are_the_schemas() -> None:
    assert feature_names() == FEATURES


# --- a small example by hand --------------------------------------------------------------

# 2018-04-01 was a Sunday.
HAND_ROWS = [
    # Customer A at terminal TA (never fraud): windows ending exactly n days apart.
    ("1", datetime(2018, 4, 2, 10), "A", "TA", 10.0, 0),
    ("2", datetime(2018, 4, 3, 10), "A", "TA", 20.0, 0),  # 1 day after 1: 1 out of the 1-day
    ("3", datetime(2018, 4, 3, 12), "A", "TA", 30.0, 0),
    ("4", datetime(2018, 4, 3, 12), "A", "TA", 60.0, 0),  # tied with 3, sorts after it
    ("5", datetime(2018, 4, 9, 10), "A", "TA", 40.0, 0),  # 7 days after 1: 1 out of the 7-day
    # Terminal T9, one customer per transaction: the label delay.
    ("10", datetime(2018, 4, 10, 8), "B", "T9", 5.0, 1),  # 8 days before 14
    ("11", datetime(2018, 4, 10, 20), "C", "T9", 5.0, 1),  # 7.5 days before 14
    ("12", datetime(2018, 4, 11, 8), "D", "T9", 5.0, 0),  # 7 days before 14
    ("13", datetime(2018, 4, 15, 8), "E", "T9", 5.0, 1),  # 3 days before 14: label not known
    ("14", datetime(2018, 4, 18, 8), "F", "T9", 5.0, 0),
    # Weekend and night edges, customer G at terminal TG.
    ("20", datetime(2018, 4, 6, 23, 59, 59), "G", "TG", 1.0, 0),  # Friday, evening
    ("21", datetime(2018, 4, 7, 6, 59, 59), "G", "TG", 1.0, 0),  # Saturday, night
    ("22", datetime(2018, 4, 8, 7, 0, 0), "G", "TG", 1.0, 0),  # Sunday, day
    ("23", datetime(2018, 4, 9, 0, 0, 0), "G", "TG", 1.0, 0),  # Monday, night
]


def hand_expected() -> dict[str, dict[str, float]]:
    """Worked out by hand from HAND_ROWS; anything not listed is 0."""
    cust = "CUSTOMER_ID_{}_{}DAY_WINDOW".format
    term = "TERMINAL_ID_{}_{}DAY_WINDOW".format
    expected: dict[str, dict[str, float]] = {}

    def customer(tx: str, windows: dict[int, list[float]]) -> None:
        for n, amounts in windows.items():
            expected[tx][cust("NB_TX", n)] = len(amounts)
            expected[tx][cust("AVG_AMOUNT", n)] = sum(amounts) / len(amounts)

    for tx, _, _, _, amount, _ in HAND_ROWS:
        expected[tx] = {}
        customer(tx, {1: [amount], 7: [amount], 30: [amount]})
    customer("2", {1: [20], 7: [10, 20], 30: [10, 20]})
    customer("3", {1: [20, 30], 7: [10, 20, 30], 30: [10, 20, 30]})
    customer("4", {1: [20, 30, 60], 7: [10, 20, 30, 60], 30: [10, 20, 30, 60]})
    customer("5", {1: [40], 7: [20, 30, 60, 40], 30: [10, 20, 30, 60, 40]})
    customer("21", {1: [1, 1], 7: [1, 1], 30: [1, 1]})  # 20 is 7 hours back
    customer("22", {1: [1], 7: [1, 1, 1], 30: [1, 1, 1]})  # 21 is 1 day and 1 second back
    customer("23", {1: [1, 1], 7: [1, 1, 1, 1], 30: [1, 1, 1, 1]})

    # 5 at 04-09 10:00: known labels up to 04-02 10:00 take in 1 (right edge included).
    for n in (1, 7, 30):
        expected["5"][term("NB_TX", n)] = 1
    # 14 at 04-18 08:00: 1-day window (04-10 08:00, 04-11 08:00] = {11, 12}, one fraud;
    # 7- and 30-day windows also take in 10 (8 days back). 13 (3 days back) is never in.
    expected["14"].update({term("NB_TX", 1): 2, term("RISK", 1): 1 / 2})
    for n in (7, 30):
        expected["14"].update({term("NB_TX", n): 3, term("RISK", n): 2 / 3})

    # All other rows fall between 08:00 and 20:00 on weekdays, but 13 (Sunday 04-15).
    weekend_night = {"13": (1, 0), "20": (0, 0), "21": (1, 1), "22": (1, 0), "23": (0, 1)}
    for tx, (weekend, night) in weekend_night.items():
        expected[tx].update(TX_DURING_WEEKEND=weekend, TX_DURING_NIGHT=night)
    return expected


def test_small_example_worked_out_by_hand() -> None:
    ours = compute_features(frame(HAND_ROWS))
    assert all(ours.schema[f] == pl.Float64 for f in FEATURES)
    rows = {row[TRANSACTION_ID]: row for row in ours.iter_rows(named=True)}
    for tx, values in hand_expected().items():
        for name in FEATURES:
            want = values.get(name, 0.0)
            assert rows[tx][name] == pytest.approx(want, abs=1e-12), f"tx {tx}, {name}"


def test_hand_example_agrees_with_reference() -> None:
    transactions = frame(HAND_ROWS)
    # Ids differ in width here: the reference's string order and ours agree on these ties.
    assert_features_close(compute_features(transactions), pandas_reference(transactions))


# --- order, laziness, labels --------------------------------------------------------------


def test_unordered_input_gives_the_same_result() -> None:
    transactions = synthetic(4).with_columns(pl.lit("x").alias("note"))
    ordered = compute_features(transactions.sort(TX_TIME, TRANSACTION_ID))
    shuffled_input = transactions.sample(fraction=1.0, shuffle=True, seed=11)
    shuffled = compute_features(shuffled_input)
    assert shuffled[TRANSACTION_ID].equals(shuffled_input[TRANSACTION_ID])  # input order kept
    assert shuffled.columns == [*transactions.columns, *FEATURES]
    assert shuffled.sort(TRANSACTION_ID).equals(ordered.sort(TRANSACTION_ID))


def test_ties_follow_numeric_id_order_whatever_the_row_order() -> None:
    at = datetime(2018, 5, 1, 12)
    rows = [("10", at, "A", "T", 100.0, 0), ("9", at, "A", "T", 1.0, 0)]
    for ordered in (rows, rows[::-1]):
        out = compute_features(frame(ordered)).sort(TRANSACTION_ID)
        # Id 9 comes before 10: its window holds itself only, 10's holds both.
        assert out["CUSTOMER_ID_NB_TX_1DAY_WINDOW"].to_list() == [2.0, 1.0]
        assert out["CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW"].to_list() == [50.5, 1.0]


def test_lazy_input_and_zone_aware_times() -> None:
    transactions = synthetic(5)
    eager = compute_features(transactions)
    assert compute_features(transactions.lazy()).equals(eager)
    # The same instants written in New York time give the same features (computed in UTC).
    zoned = transactions.with_columns(
        pl.col(TX_TIME).dt.replace_time_zone("UTC").dt.convert_time_zone("America/New_York")
    )
    assert compute_features(zoned).select(FEATURES).equals(eager.select(FEATURES))


def test_unknown_labels_are_left_out_of_a_terminals_fraud_share() -> None:
    """History labelled up to an index's cutoff, or an unlabelled batch: a row whose label is
    not known counts among the terminal's transactions but not in its fraud share (counted as
    genuine it would pull the share down: production features lower than the model's)."""
    t0 = datetime(2024, 5, 1, 12)
    rows = pl.DataFrame({
        TRANSACTION_ID: ["a", "b", "c", "d", "q"],
        TX_TIME: [t0, t0 + timedelta(hours=1), t0 + timedelta(hours=2),
                  t0 + timedelta(hours=3), t0 + timedelta(days=8)],
        CUSTOMER_ID: ["c1", "c2", "c3", "c4", "c5"],
        TERMINAL_ID: ["T"] * 5,
        AMOUNT: [10.0] * 5,
        IS_FRAUD: [1, 0, None, None, None],
    }, schema_overrides={IS_FRAUD: pl.Int8})
    q = compute_features(rows).row(4, named=True)
    assert q["TERMINAL_ID_NB_TX_7DAY_WINDOW"] == 4.0  # a-d are 8 days before q: in its window
    assert q["TERMINAL_ID_RISK_7DAY_WINDOW"] == 0.5  # 1 fraud of the 2 known labels, not 1/4
    unknown = compute_features(rows.with_columns(pl.lit(None, pl.Int8).alias(IS_FRAUD)))
    assert unknown.row(4, named=True)["TERMINAL_ID_RISK_7DAY_WINDOW"] == 0.0  # none known


def test_files_without_labels_have_no_terminal_fraud_share() -> None:
    transactions = synthetic(6)
    zeros = compute_features(transactions.with_columns(pl.lit(0, pl.Int8).alias(IS_FRAUD)))
    absent = compute_features(transactions.drop(IS_FRAUD))
    nulls = compute_features(transactions.with_columns(pl.lit(None, pl.Int8).alias(IS_FRAUD)))
    assert IS_FRAUD not in absent.columns
    assert absent.select(FEATURES).equals(zeros.select(FEATURES))
    assert nulls.select(FEATURES).equals(zeros.select(FEATURES))
    assert zeros["TERMINAL_ID_RISK_30DAY_WINDOW"].max() == 0.0
    assert compute_features(transactions)["TERMINAL_ID_RISK_30DAY_WINDOW"].max() > 0.0


def test_existing_feature_columns_are_replaced() -> None:
    transactions = synthetic(7, n=200)
    stale = transactions.with_columns(pl.lit(-1.0).alias(f) for f in FEATURES)
    assert compute_features(stale).equals(compute_features(transactions))


def test_empty_input_gives_empty_features() -> None:
    out = compute_features(synthetic(8).head(0))
    assert out.height == 0 and set(FEATURES) <= set(out.columns)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("column", [TX_TIME, TERMINAL_ID, AMOUNT])
def test_missing_required_column_is_named(column: str) -> None:
    with pytest.raises(ValueError, match=f"lack required column.*{column}"):
        compute_features(synthetic(0, n=20).drop(column))


def test_null_required_value_is_named_with_its_row() -> None:
    transactions = synthetic(0, n=20).with_columns(
        pl.when(pl.int_range(pl.len()) == 4).then(None).otherwise(pl.col(AMOUNT)).alias(AMOUNT)
    )
    with pytest.raises(ValueError, match=f"{AMOUNT} is null in 1 row.*row 4"):
        compute_features(transactions)


def test_repeated_transaction_id_is_refused() -> None:
    transactions = synthetic(0, n=20)
    with pytest.raises(ValueError, match="must be unique.*" + transactions[TRANSACTION_ID][0]):
        compute_features(pl.concat([transactions, transactions.head(1)]))


def test_bad_windows_and_delay_are_refused() -> None:
    transactions = synthetic(0, n=20)
    with pytest.raises(ValueError, match="label_delay_days"):
        compute_features(transactions, label_delay_days=0)
    with pytest.raises(ValueError, match="windows_days"):
        compute_features(transactions, windows_days=(1, 0))


# --- batches scored against earlier history -----------------------------------------------


def test_batch_features_equal_those_of_the_concatenation() -> None:
    transactions = synthetic(9)
    cutoff = datetime(2018, 5, 20)
    context = transactions.filter(pl.col(TX_TIME) < cutoff).with_columns(
        pl.lit("shop").alias("merchant_name")  # an extra column the batch does not have
    )
    batch = (
        transactions.filter(pl.col(TX_TIME) >= cutoff)
        .drop(IS_FRAUD)  # labels not known when scoring
        .with_columns(pl.lit("card-present").alias("channel"))
        .sample(fraction=1.0, shuffle=True, seed=3)
    )
    # One batch row is also in the context, with a stale amount: the batch's copy must win.
    overlap = batch.head(1).with_columns(pl.lit(9999.0).alias(AMOUNT), pl.lit(1).alias(IS_FRAUD))
    context = pl.concat([context, overlap.drop("channel")], how="diagonal_relaxed")

    out = compute_batch_features(batch, context)
    assert out.columns == [*batch.columns, *FEATURES]
    assert out[TRANSACTION_ID].equals(batch[TRANSACTION_ID])

    whole = pl.concat(
        [transactions.filter(pl.col(TX_TIME) < cutoff), batch.drop("channel")],
        how="diagonal_relaxed",
    )
    expected = pandas_reference(whole).filter(pl.col(TRANSACTION_ID).is_in(batch[TRANSACTION_ID]))
    assert_features_close(out, expected)


def test_batch_without_context_is_the_batch_alone() -> None:
    batch = synthetic(10, n=300)
    alone = compute_batch_features(batch, None)
    assert alone.equals(compute_features(batch))
    assert compute_batch_features(batch, batch.head(0)).equals(alone)


def test_batch_context_with_other_dtypes_and_no_labels() -> None:
    """Unlabelled history counts among the terminal's transactions but not in its fraud share;
    ns times and Float32 amounts are aligned."""
    transactions = synthetic(11, n=400)
    context, batch = transactions.head(300), transactions.tail(100)
    loose = context.drop(IS_FRAUD).with_columns(
        pl.col(TX_TIME).cast(pl.Datetime("ns")), pl.col(AMOUNT).cast(pl.Float32)
    )
    out = compute_batch_features(batch, loose)

    unlabelled = context.with_columns(
        pl.lit(None, pl.Int8).alias(IS_FRAUD), pl.col(AMOUNT).cast(pl.Float32).cast(pl.Float64)
    )
    whole = pl.concat([unlabelled, batch])
    expected = pandas_reference(whole).filter(pl.col(TRANSACTION_ID).is_in(batch[TRANSACTION_ID]))
    assert_features_close(out, expected)
    counted_as_genuine = pandas_reference(whole.with_columns(pl.col(IS_FRAUD).fill_null(0)))
    assert not counted_as_genuine.filter(pl.col(TRANSACTION_ID).is_in(batch[TRANSACTION_ID]))[
        "TERMINAL_ID_RISK_30DAY_WINDOW"].equals(expected["TERMINAL_ID_RISK_30DAY_WINDOW"])
    assert out["TERMINAL_ID_RISK_30DAY_WINDOW"].max() > 0  # the batch's own labels still count


@pytest.mark.parametrize("which", ["batch", "context"])
def test_batch_missing_required_column_is_named(which: str) -> None:
    transactions = synthetic(0, n=40)
    batch, context = transactions.tail(10), transactions.head(30)
    if which == "batch":
        batch = batch.drop(CUSTOMER_ID)
    else:
        context = context.drop(CUSTOMER_ID)
    with pytest.raises(ValueError, match=f"{which} lack required column.*{CUSTOMER_ID}"):
        compute_batch_features(batch, context)


# --- a brute-force reference: the window definitions, row by row ---------------------------


def brute_force(rows: list[dict], delay: int, windows: tuple[int, ...]) -> list[dict]:
    """Each row's features straight from the definitions, one loop over all rows per row: a
    customer's window holds its rows in (t - n, t] that sort at or before this one (time, then
    shorter id, then id); a terminal's holds its rows in (t - delay - n, t - delay], the share
    over those whose label is known. Rows: dicts of tid, t (naive UTC), c, m, a, f."""
    def place(r: dict) -> tuple:
        return r["t"], len(str(r["tid"]).encode()), str(r["tid"])

    out = []
    for r in rows:
        t, d = r["t"], {}
        d["TX_DURING_WEEKEND"] = float(t.isoweekday() >= 6)
        d["TX_DURING_NIGHT"] = float(t.hour <= 6)
        for n in windows:
            amounts = [o["a"] for o in rows if o["c"] == r["c"] and o["t"] > t - timedelta(n)
                       and place(o) <= place(r)]
            d[f"CUSTOMER_ID_NB_TX_{n}DAY_WINDOW"] = len(amounts)
            d[f"CUSTOMER_ID_AVG_AMOUNT_{n}DAY_WINDOW"] = sum(amounts) / len(amounts)
        for n in windows:
            labels = [o["f"] for o in rows if o["m"] == r["m"]
                      and t - timedelta(delay + n) < o["t"] <= t - timedelta(delay)]
            known = [f for f in labels if f is not None]
            d[f"TERMINAL_ID_NB_TX_{n}DAY_WINDOW"] = len(labels)
            d[f"TERMINAL_ID_RISK_{n}DAY_WINDOW"] = sum(known) / len(known) if known else 0.0
        out.append(d)
    return out


def edge_rows(rng: np.random.Generator, n: int, step: timedelta, span: int) -> list[dict]:
    """Rows on a coarse grid (whole days, hours or seconds from one instant): many ties on a
    card and on a terminal, many pairs exactly n and delay + n days apart; ids of mixed widths,
    some looking numeric, some unicode; unknown labels mixed in."""
    # Saturday 03:00 UTC is Friday evening in New York; the New York (03-11) and London
    # (03-25) clocks change within 70 days of it.
    start = datetime(2018, 3, 10, 3)
    prefixes = ["", "", "a", "é", "0"]
    return [
        {
            "tid": f"{prefixes[int(rng.integers(5))]}{tid}",
            "t": start + step * int(rng.integers(0, span + 1)),
            "c": int(rng.integers(0, 3)),
            "m": int(rng.integers(0, 2)),
            "a": float(rng.integers(1, 1000)) / 4,
            "f": [0, 0, 1, None][int(rng.integers(4))],
        }
        for tid in rng.choice(5000, n, replace=False)
    ]


ID_DTYPES = {  # the customer and terminal id columns as given, from the small integers drawn
    "string": lambda ids: pl.Series([f"id{i}" if i else "" for i in ids], dtype=pl.String),
    "numeric text": lambda ids: pl.Series([str(10 - i) for i in ids], dtype=pl.String),
    "unicode": lambda ids: pl.Series(["ü" * i + "中" for i in ids], dtype=pl.String),
    "integer": lambda ids: pl.Series([i - 1 for i in ids], dtype=pl.Int64),
    "categorical": lambda ids: pl.Series([f"k{2 - i}" for i in ids], dtype=pl.Categorical),
    "uint64 over 2**63": lambda ids: pl.Series([2**63 + i for i in ids], dtype=pl.UInt64),
}


def test_features_match_a_brute_force_reference_on_edges() -> None:
    """Ties, window edges at exactly t - n and t - delay - n, odd windows and delays, every id
    dtype, zone-aware times across a clock change, lazy input, a single row, one instant."""
    rng = np.random.default_rng(20240601)
    grids = [(timedelta(days=1), 70), (timedelta(hours=12), 60), (timedelta(seconds=1), 2),
             (timedelta(0), 0)]
    settings = [(7, (1, 7, 30)), (1, (1,)), (14, (2, 5, 60)), (3, (30, 1))]
    checked = 0
    for trial in range(48):
        step, span = grids[trial % len(grids)]
        delay, windows = settings[trial // len(grids) % len(settings)]
        ids = list(ID_DTYPES)[trial % len(ID_DTYPES)]
        rows = edge_rows(rng, [40, 90, 1, 2][(trial + trial // 4) % 4], step, span)
        transactions = pl.DataFrame({
            TRANSACTION_ID: [r["tid"] for r in rows],
            TX_TIME: pl.Series([r["t"] for r in rows], dtype=pl.Datetime("us")),
            CUSTOMER_ID: ID_DTYPES[ids]([r["c"] for r in rows]),
            TERMINAL_ID: ID_DTYPES[ids]([r["m"] for r in rows]),
            AMOUNT: [r["a"] for r in rows],
            IS_FRAUD: pl.Series([r["f"] for r in rows], dtype=pl.Int8),
        })
        if trial % 3 == 1:  # the same instants on a zone's clock
            zone = ["America/New_York", "Europe/London"][trial % 2]
            transactions = transactions.with_columns(
                pl.col(TX_TIME).dt.replace_time_zone("UTC").dt.convert_time_zone(zone))
        given = transactions.lazy() if trial % 5 == 0 else transactions
        ours = compute_features(given, label_delay_days=delay, windows_days=windows)
        names = feature_names(windows)
        got = ours.select(names).rows(named=True)
        for i, want in enumerate(brute_force(rows, delay, windows)):
            for name in names:
                assert got[i][name] == pytest.approx(want[name], rel=1e-12, abs=1e-12), (
                    f"trial {trial} ({ids} ids, delay {delay}, windows {windows}), "
                    f"row {rows[i]}: {name}")
                checked += 1
    assert checked > 12_000


def test_batch_features_match_brute_force_with_overlapping_context() -> None:
    """Context rows whose ids are also in the batch (a stale copy) are replaced by the batch's;
    the batch may sit before, among or after its context, and be unlabelled."""
    rng = np.random.default_rng(7)
    for trial in range(12):
        rows = edge_rows(rng, 60, timedelta(hours=12), 60)
        batch_rows, context_rows = rows[:[1, 5, 20][trial % 3]], rows[20:]
        stale = [dict(r, a=9999.0, f=1) for r in batch_rows[::2]]
        labelled = trial % 2 == 0
        if not labelled:
            batch_rows = [dict(r, f=None) for r in batch_rows]

        def as_frame(part: list[dict], with_labels: bool = True) -> pl.DataFrame:
            columns = {
                TRANSACTION_ID: [r["tid"] for r in part],
                TX_TIME: pl.Series([r["t"] for r in part], dtype=pl.Datetime("us")),
                CUSTOMER_ID: [str(r["c"]) for r in part],
                TERMINAL_ID: [str(r["m"]) for r in part],
                AMOUNT: [r["a"] for r in part],
            }
            if with_labels:
                columns[IS_FRAUD] = pl.Series([r["f"] for r in part], dtype=pl.Int8)
            return pl.DataFrame(columns, schema_overrides={CUSTOMER_ID: pl.String,
                                                           TERMINAL_ID: pl.String})

        out = compute_batch_features(as_frame(batch_rows, labelled),
                                     as_frame(stale + context_rows))
        assert out[TRANSACTION_ID].to_list() == [r["tid"] for r in batch_rows]
        want = brute_force(batch_rows + context_rows, 7, (1, 7, 30))
        for i, got in enumerate(out.select(FEATURES).rows(named=True)):
            for name in FEATURES:
                assert got[name] == pytest.approx(want[i][name], rel=1e-12, abs=1e-12), (
                    f"trial {trial}, batch row {i}: {name}")
