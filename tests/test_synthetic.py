"""The synthetic generator against the fraud handbook's simulation rules, checked from the
generated data and the profile tables by independent reference computations."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.synthetic import (
    CATEGORIES,
    COUNTRY_CURRENCY,
    FRAUD_PRONE_CATEGORIES,
    SyntheticConfig,
    build_profiles,
    compromise_schedule,
    generate,
    iter_chunks,
    write_parquet,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SMALL = SyntheticConfig(n_customers=300, n_terminals=600, n_days=60, seed=11)
START = dt.datetime(2018, 4, 1)
# P(0 <= N(43200, 20000) < 86400): the share of drawn times the handbook keeps.
P_TIME_KEPT = math.erf(43_200 / 20_000 / math.sqrt(2))
CNP = "card-not-present"


@pytest.fixture(scope="module")
def small() -> pl.DataFrame:
    return generate(SMALL).with_columns(
        day=(pl.col(schema.TX_TIME) - START).dt.total_days(),
        cust=pl.col(schema.CUSTOMER_ID).cast(pl.Int64),
        term=pl.col(schema.TERMINAL_ID).cast(pl.Int64),
    )


@pytest.fixture(scope="module")
def profiles():
    return build_profiles(SMALL)


@pytest.fixture(scope="module")
def schedule():
    return compromise_schedule(SMALL)


def _leak_counts(config: SyntheticConfig, customers: np.ndarray) -> np.ndarray:
    """(n_days, n_customers): how many scenario-3 leaks cover each customer on each day."""
    counts = np.zeros((config.n_days, config.n_customers), dtype=np.int64)
    for start, row in enumerate(customers):
        for c in row:
            counts[start : start + config.customer_compromise_days, c] += 1
    return counts


# --- determinism and shape -------------------------------------------------------------------


def test_same_seed_same_frame_other_seed_other_frame() -> None:
    a = generate(SMALL)
    assert a.equals(generate(SMALL))
    other = generate(SyntheticConfig(n_customers=300, n_terminals=600, n_days=60, seed=12))
    assert not a.equals(other)
    assert a.height > 20_000 and other.height > 20_000


def test_output_does_not_depend_on_chunk_size() -> None:
    # Compromise windows (28 and 14 days) straddle chunk boundaries for both chunk sizes, so
    # this also shows that compromised terminals/customers carry over from chunk to chunk.
    a = generate(SyntheticConfig(n_customers=300, n_terminals=600, n_days=60, chunk_days=5))
    b = generate(SyntheticConfig(n_customers=300, n_terminals=600, n_days=60, chunk_days=60))
    assert a.equals(b)
    assert a[schema.FRAUD_SCENARIO].is_in([2, 3]).sum() > 100


def test_columns_and_dtypes_are_canonical() -> None:
    frame = generate(SMALL)
    expected = [
        "transaction_id", "tx_time", "customer_id", "terminal_id", "amount", "currency",
        "merchant_name", "merchant_category", "channel", "country", "is_fraud", "fraud_scenario",
    ]  # fmt: skip
    assert frame.columns == expected
    for name, dtype in frame.schema.items():
        assert dtype == schema.DTYPES[name], name
    assert frame.null_count().sum_horizontal().item() == 0


def test_times_sorted_whole_seconds_inside_the_simulated_days(small: pl.DataFrame) -> None:
    times = small[schema.TX_TIME]
    assert times.is_sorted()
    assert times.min() >= START
    assert times.max() < START + dt.timedelta(days=SMALL.n_days)
    assert (times.dt.microsecond() == 0).all()
    # Every day has payments (about 300 customers x 2 a day).
    assert small["day"].n_unique() == SMALL.n_days


def test_transaction_ids_are_sequential_strings(small: pl.DataFrame) -> None:
    ids = small[schema.TRANSACTION_ID]
    assert ids.n_unique() == small.height
    assert ids.to_list() == [str(i) for i in range(small.height)]


def test_amounts_are_non_negative_cents(small: pl.DataFrame) -> None:
    amount = small[schema.AMOUNT].to_numpy()
    assert (amount >= 0).all()
    np.testing.assert_allclose(amount * 100, np.round(amount * 100), atol=1e-6)


def test_iter_chunks_yields_one_frame_per_chunk_of_days() -> None:
    config = SyntheticConfig(n_customers=100, n_terminals=200, n_days=20, chunk_days=7)
    chunks = list(iter_chunks(config))
    assert len(chunks) == 3
    next_id = 0
    for i, chunk in enumerate(chunks):
        days = (chunk[schema.TX_TIME] - START).dt.total_days()
        assert days.min() >= 7 * i and days.max() < min(7 * (i + 1), 20)
        assert chunk[schema.TRANSACTION_ID][0] == str(next_id)
        next_id += chunk.height


# --- profiles --------------------------------------------------------------------------------


def test_profiles_follow_the_handbook_distributions(profiles) -> None:
    c, t = profiles.customers, profiles.terminals
    assert c.height == SMALL.n_customers and t.height == SMALL.n_terminals
    for frame in (c, t):
        assert frame["x"].is_between(0, 100, closed="left").all()
        assert frame["y"].is_between(0, 100, closed="left").all()
    assert c["mean_amount"].is_between(5, 100).all()
    np.testing.assert_allclose(c["std_amount"].to_numpy(), c["mean_amount"].to_numpy() / 2)
    assert c["mean_nb_tx_per_day"].is_between(0, 4, closed="left").all()
    # U(5, 100) has mean 52.5 and sd 27.4: the mean of 300 draws is within 52.5 +- 6 (3.8 sd).
    assert abs(c["mean_amount"].mean() - 52.5) < 6


def test_available_terminals_are_exactly_those_within_the_radius(profiles) -> None:
    c = profiles.customers.select("x", "y").to_numpy()
    t = profiles.terminals.select("x", "y").to_numpy()
    dist = np.sqrt(((c[:, None, :] - t[None, :, :]) ** 2).sum(axis=2))  # brute force, 300 x 600
    for i in range(SMALL.n_customers):
        expected = np.flatnonzero(dist[i] < SMALL.radius)
        np.testing.assert_array_equal(profiles.available_terminals(i), expected)
    # 600 terminals on 100 x 100: about 600 * pi * 25 / 1e4 = 4.7 per customer (fewer at edges).
    assert 3.0 < np.diff(profiles.offsets).mean() < 5.0


def test_payments_go_to_terminals_within_the_radius(small, profiles) -> None:
    c = profiles.customers.select("x", "y").to_numpy()
    t = profiles.terminals.select("x", "y").to_numpy()
    local = small.filter(pl.col(schema.FRAUD_SCENARIO) != 3)
    cust, term = local["cust"].to_numpy(), local["term"].to_numpy()
    dist = np.sqrt(((c[cust] - t[term]) ** 2).sum(axis=1))
    assert (dist < SMALL.radius).all()
    # Customers with no terminal in reach make no payments.
    n_reach = np.diff(profiles.offsets)
    assert (n_reach[small["cust"].unique().to_numpy()] > 0).all()


def test_payments_per_customer_day(small, profiles) -> None:
    reach = np.diff(profiles.offsets) > 0
    rate = profiles.customers["mean_nb_tx_per_day"].to_numpy()
    per_day = small.height / (reach.sum() * SMALL.n_days)
    # E[Poisson(U(0, 4))] = 2, less the dropped times; the profile mean of 300 customers has
    # sd 4 / sqrt(12 * 300) = 0.067, so 0.25 is over 3.5 sd.
    assert abs(per_day - 2 * P_TIME_KEPT) < 0.25
    # Given the drawn profiles, only Poisson noise remains (total ~35k, sd ~190 = 0.6 %).
    expected = rate[reach].sum() * P_TIME_KEPT * SMALL.n_days
    assert abs(small.height / expected - 1) < 0.03


# --- fraud scenarios -------------------------------------------------------------------------


def test_scenario_1_is_exactly_the_large_genuine_amounts(small: pl.DataFrame) -> None:
    s1 = small.filter(pl.col(schema.FRAUD_SCENARIO) == 1)
    assert s1.height > 0
    assert (s1[schema.AMOUNT] > 220).all()
    assert (small.filter(pl.col(schema.AMOUNT) > 220)[schema.IS_FRAUD] == 1).all()
    assert (small[schema.IS_FRAUD] == (small[schema.FRAUD_SCENARIO] > 0).cast(pl.Int8)).all()


def test_compromise_schedule_shape(schedule) -> None:
    assert schedule.terminals.shape == (SMALL.n_days, 2)
    assert schedule.customers.shape == (SMALL.n_days, 3)
    assert all(len(set(row)) == len(row) for row in schedule.terminals)
    assert schedule.terminals.min() >= 0 and schedule.terminals.max() < SMALL.n_terminals
    assert schedule.customers.min() >= 0 and schedule.customers.max() < SMALL.n_customers


def test_scenario_2_compromised_terminals_are_fraud_for_28_days(small, schedule) -> None:
    compromised = pl.DataFrame(
        [
            {"term": int(t), "day": d + k}
            for d, row in enumerate(schedule.terminals)
            for t in row
            for k in range(28)
            if d + k < SMALL.n_days
        ]
    ).unique()
    hit = small.join(compromised, on=["term", "day"], how="semi")
    assert hit.height > 500
    # Every payment on a compromised terminal in its window is fraud (scenario 3 may override).
    assert (hit[schema.IS_FRAUD] == 1).all()
    assert hit[schema.FRAUD_SCENARIO].is_in([2, 3]).all()
    # Precedence as in the handbook: leaked-card picks (3) override compromised terminals (2).
    assert (hit[schema.FRAUD_SCENARIO] == 3).sum() > 20
    # ... and scenario 2 is nothing else.
    s2 = small.filter(pl.col(schema.FRAUD_SCENARIO) == 2)
    assert s2.join(compromised, on=["term", "day"], how="anti").height == 0
    # From the data alone: on the day of a terminal's first scenario-2 fraud, every later
    # payment at that terminal that day is fraud.
    first = s2.group_by("term").agg(first=pl.col(schema.TX_TIME).min(), day=pl.col("day").min())
    same_day_after = small.join(first, on=["term", "day"]).filter(
        pl.col(schema.TX_TIME) >= pl.col("first")
    )
    assert (same_day_after[schema.IS_FRAUD] == 1).all()


def test_scenario_3_picks_a_third_of_leaked_cards_payments(small, profiles, schedule) -> None:
    leaks = _leak_counts(SMALL, schedule.customers)
    k = leaks[small["day"].to_numpy(), small["cust"].to_numpy()]
    s3 = (small[schema.FRAUD_SCENARIO] == 3).to_numpy()
    assert s3.sum() > 500
    assert (k[s3] > 0).all(), "scenario 3 only on customers leaked that day"
    # A payment covered by exactly one leak is picked with probability 1/3 (n ~ 4000, sd 0.007).
    assert abs(s3[k == 1].mean() - 1 / 3) < 0.035

    # Expected count from the profiles: each leaked customer-day contributes its expected
    # payments times P(picked by at least one of its k leaks).
    rate = profiles.customers["mean_nb_tx_per_day"].to_numpy() * (np.diff(profiles.offsets) > 0)
    expected = (rate[None, :] * P_TIME_KEPT * (1 - (2 / 3) ** leaks)).sum()
    assert abs(s3.sum() / expected - 1) < 0.15


def test_scenario_3_amounts_are_five_times_usual(small: pl.DataFrame) -> None:
    usual = (
        small.filter(pl.col(schema.FRAUD_SCENARIO) == 0)
        .group_by("cust")
        .agg(usual=pl.col(schema.AMOUNT).median())
    )
    ratio = (
        small.filter(pl.col(schema.FRAUD_SCENARIO) == 3)
        .join(usual, on="cust")
        .select(pl.col(schema.AMOUNT) / pl.col("usual"))
        .to_series()
    )
    assert 3 < ratio.median() < 8


def test_fraud_rate_with_handbook_defaults() -> None:
    frame = generate(SyntheticConfig())
    # Handbook: 1,754,155 payments over 183 days (shared/data README); the profile draw of 5000
    # customers moves the count by about 0.8 % (1 sd), so 3 % is generous.
    assert abs(frame.height / 1_754_155 - 1) < 0.03
    # Handbook: about 0.8 % fraud (0.81 % over the first four months). Scenario 2 depends on
    # which 366 terminals get compromised, scenario 3 on 549 cards: allow 0.6 % .. 1.1 %.
    assert 0.006 < frame[schema.IS_FRAUD].mean() < 0.011
    per_scenario = frame[schema.FRAUD_SCENARIO].value_counts().sort(schema.FRAUD_SCENARIO)
    assert per_scenario[schema.FRAUD_SCENARIO].to_list() == [0, 1, 2, 3]


@pytest.mark.shared_data
def test_fraud_mix_matches_the_handbook_dataset() -> None:
    path = SHARED_DATA / "fraud-handbook" / "raw-2018-04-01_2018-07-31.parquet"
    if not path.exists():
        pytest.skip(f"needs the handbook's simulated data at {path}")
    reference = pl.read_parquet(path, columns=["TX_FRAUD", "TX_FRAUD_SCENARIO"])
    n_days = 122  # 2018-04-01 .. 2018-07-31
    ours = generate(SyntheticConfig(n_days=n_days))
    assert abs(ours.height / reference.height - 1) < 0.03
    assert abs(ours[schema.IS_FRAUD].mean() - reference["TX_FRAUD"].mean()) < 0.002
    for scenario in (1, 2, 3):
        theirs = (reference["TX_FRAUD_SCENARIO"] == scenario).sum()
        mine = (ours[schema.FRAUD_SCENARIO] == scenario).sum()
        assert abs(mine / theirs - 1) < 0.3, f"scenario {scenario}: {mine} vs {theirs}"


# --- merchant text ---------------------------------------------------------------------------


def test_merchant_fields_are_consistent(small: pl.DataFrame) -> None:
    assert set(small[schema.MERCHANT_CATEGORY].unique()) <= set(CATEGORIES)
    assert len(CATEGORIES) == 12
    assert set(small[schema.CHANNEL].unique()) == set(schema.CHANNELS)
    pairs = small.select(schema.COUNTRY, schema.CURRENCY).unique().rows()
    assert all(COUNTRY_CURRENCY[country] == currency for country, currency in pairs)
    physical = small.filter(pl.col(schema.MERCHANT_CATEGORY).is_in(["fuel", "cash withdrawal"]))
    assert (physical[schema.CHANNEL] == "card-present").all()
    genuine = small.filter(pl.col(schema.IS_FRAUD) == 0)
    assert (genuine[schema.COUNTRY] == SMALL.home_country).mean() > 0.8
    # Names are a prefix word plus a category noun, e.g. "Northgate Grocers".
    names = small[schema.MERCHANT_NAME]
    assert names.str.split(" ").list.len().min() >= 2
    assert names.n_unique() > 100


def test_fraud_text_signal_is_partial(small: pl.DataFrame) -> None:
    def cnp_share(frame: pl.DataFrame) -> float:
        return (frame[schema.CHANNEL] == CNP).mean()

    genuine = small.filter(pl.col(schema.IS_FRAUD) == 0)
    fraud = small.filter(pl.col(schema.IS_FRAUD) == 1)
    s3 = small.filter(pl.col(schema.FRAUD_SCENARIO) == 3)
    assert cnp_share(fraud) > cnp_share(genuine) + 0.1
    assert cnp_share(s3) > 0.7
    # Partial: genuine customers shop card-not-present too, and frauds are not all abroad.
    assert 0.1 < cnp_share(genuine) < 0.5
    foreign = pl.col(schema.COUNTRY) != SMALL.home_country
    assert 0.2 < s3.select(foreign.mean()).item() < 0.9
    assert s3.select(foreign.mean()).item() > genuine.select(foreign.mean()).item() + 0.1
    rerouted = s3.filter(pl.col(schema.CHANNEL) == CNP)
    assert rerouted[schema.MERCHANT_CATEGORY].is_in(FRAUD_PRONE_CATEGORIES).mean() > 0.8


# --- Parquet ---------------------------------------------------------------------------------


def test_write_parquet_streams_one_row_group_per_chunk(tmp_path: Path) -> None:
    path = tmp_path / "tx.parquet"
    calls: list[tuple[int, int]] = []
    rows = write_parquet(SMALL, path, progress=lambda done, total: calls.append((done, total)))
    expected = generate(SMALL)
    assert rows == expected.height
    assert pl.read_parquet(path).equals(expected)
    assert calls == [(d, 60) for d in (7, 14, 21, 28, 35, 42, 49, 56, 60)]

    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == math.ceil(60 / 7)
    chunk_rows = [c.height for c in iter_chunks(SMALL)]
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == chunk_rows
    assert max(chunk_rows) < rows / 6  # each group holds one week, not the whole file
    assert [p.name for p in tmp_path.iterdir()] == ["tx.parquet"]

    again = tmp_path / "again.parquet"
    write_parquet(SMALL, again)
    assert again.read_bytes() == path.read_bytes()


def test_write_parquet_leaves_the_old_file_when_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "tx.parquet"
    path.write_bytes(b"old")

    def stop(done: int, total: int) -> None:
        if done >= 14:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        write_parquet(SMALL, path, progress=stop)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["tx.parquet"]


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"n_customers": 0}, ValueError, "n_customers"),
        ({"n_days": 1.5}, TypeError, "n_days"),
        ({"radius": -1.0}, ValueError, "radius"),
        ({"compromised_share": 1.5}, ValueError, "compromised_share"),
        ({"home_country": "XX"}, ValueError, "home_country"),
        ({"start_date": "2018-04-01"}, TypeError, "start_date"),
        ({"seed": -3}, ValueError, "seed"),
    ],
)
def test_bad_config_names_the_field(kwargs, error, field) -> None:
    with pytest.raises(error, match=field):
        SyntheticConfig(**kwargs)


def test_days_past_the_last_calendar_day_are_refused() -> None:
    """Times after 9999-12-31 cannot be read back as datetimes: a config reaching past it is
    refused by name, before any (possibly hours of) work."""
    with pytest.raises(ValueError, match="n_days"):
        SyntheticConfig(start_date=dt.date(9999, 12, 20), n_days=30)
    with pytest.raises(ValueError, match="n_days"):
        SyntheticConfig(n_days=100_000_000)
    last = SyntheticConfig(start_date=dt.date(9999, 12, 1), n_days=31, n_customers=5,
                           n_terminals=5)
    assert last.n_days == 31


# --- CLI: generate and demo options ------------------------------------------------------------


def _run_cli(*args: str) -> tuple[int, str]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from reliability_workers import run_cli

    code, out, err = run_cli(*args)
    return code, " ".join((out + err).split())


def _refused(code: int, text: str, *expected: str) -> None:
    assert code == 2, text
    assert "error:" in text and "Traceback" not in text, text
    for piece in expected:
        assert piece in text, (piece, text)


def test_generate_refuses_nonsense_options_by_name(tmp_path: Path) -> None:
    target = str(tmp_path / "g.parquet")
    _refused(*_run_cli("generate", "-o", target, "--days", "100000000"), "--days")
    _refused(*_run_cli("generate", "-o", target, "--start", "9999-12-20", "--days", "30"),
             "--days", "9999-12-31")
    _refused(*_run_cli("generate", "-o", target, "--seed", "-1"), "--seed", ">= 0")
    # A time of day would be dropped without a word: --start is a day.
    _refused(*_run_cli("generate", "-o", target, "--start", "2018-04-01T10:00"), "--start",
             "'2018-04-01T10:00'")
    assert not (tmp_path / "g.parquet").exists()


def test_demo_refuses_too_few_days_or_cards_before_any_work(tmp_path: Path) -> None:
    from pipeline.demo import DemoConfig

    work = tmp_path / "demo"
    # The index needs labels known before the scored week: 7 scored days + 7 days' label delay
    # leave no history to index in 10 days (the flow used to fail late, on the index cutoff).
    _refused(*_run_cli("demo", "--workdir", str(work), "--days", "10"), "--days", "15")
    _refused(*_run_cli("demo", "--workdir", str(work), "--customers", "0"), "--customers")
    _refused(*_run_cli("demo", "--workdir", str(work), "--terminals", "-3"), "--terminals")
    assert not work.exists()
    with pytest.raises(ValueError, match="days"):
        DemoConfig(workdir=work, days=14)
    assert DemoConfig(workdir=work, days=15).days == 15
