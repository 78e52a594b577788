"""Tests for pipeline.ingest: every row read is accepted or quarantined, never lost."""

from __future__ import annotations

import csv
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import schema
from pipeline.ingest import (
    MAX_AMOUNT,
    IngestResult,
    IngestWarning,
    InputError,
    canonical_columns,
    read_quarantine,
    read_transactions,
    validate_transactions,
    write_quarantine,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HANDBOOK_RAW = DATA / "fraud-handbook" / "raw-2018-04-01_2018-07-31.parquet"
T0 = datetime(2018, 4, 1, 0, 0, 31)


def checked(result: IngestResult) -> IngestResult:
    """The invariant every test relies on, checked from the frames themselves."""
    assert result.rows_in == result.accepted.height + result.quarantined.height
    assert result.counts == {
        "rows_in": result.rows_in,
        "accepted": result.accepted.height,
        "quarantined": result.quarantined.height,
    }
    rows = result.quarantined.get_column("row_number")
    assert rows.n_unique() == rows.len()
    assert rows.is_between(0, result.rows_in - 1).all()
    assert result.quarantined.schema == {
        "row_number": pl.Int64,
        "field": pl.String,
        "reason": pl.String,
        "raw": pl.String,
    }
    assert result.quarantined.get_column("field").null_count() == 0
    for raw in result.quarantined.get_column("raw"):
        json.loads(raw)  # always JSON
    for name, dtype in result.accepted.schema.items():
        assert dtype == schema.DTYPES[name]
    return result


def read(path: Path, **kwargs) -> IngestResult:
    return checked(read_transactions(path, **kwargs))


def rows(n: int = 3, **columns: list) -> list[dict]:
    """n good rows in canonical names; keyword lists override whole columns."""
    base = {
        "transaction_id": [f"t{i}" for i in range(n)],
        "tx_time": [(T0 + timedelta(minutes=i)).isoformat() for i in range(n)],
        "customer_id": ["c1"] * n,
        "terminal_id": ["m1"] * n,
        "amount": [str(10.0 + i) for i in range(n)],
    }
    base.update(columns)
    return [{k: v[i] for k, v in base.items()} for i in range(n)]


def write_csv(path: Path, records: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def quarantined(result: IngestResult) -> dict[int, tuple[str, str]]:
    return {
        r["row_number"]: (r["field"], r["reason"]) for r in result.quarantined.iter_rows(named=True)
    }


# --- the handbook's vocabulary --------------------------------------------------------------


def handbook_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "TRANSACTION_ID": [0, 1, 2, 3],
            "TX_DATETIME": [T0 + timedelta(seconds=97 * i) for i in range(4)],
            "CUSTOMER_ID": [596, 4961, 2, 596],
            "TERMINAL_ID": [3156, 3412, 1365, 8737],
            "TX_AMOUNT": [57.16, 81.51, 146.0, 64.49],
            "TX_TIME_SECONDS": [31, 128, 225, 322],
            "TX_FRAUD": [0, 0, 1, 0],
            "TX_FRAUD_SCENARIO": [0, 0, 2, 0],
        }
    )


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl", ".ndjson", ".json"])
def test_handbook_column_names_load_without_renaming(tmp_path: Path, suffix: str) -> None:
    frame = handbook_frame()
    path = tmp_path / f"handbook{suffix}"
    if suffix == ".parquet":
        frame.write_parquet(path)
    elif suffix == ".csv":
        frame.write_csv(path)
    elif suffix == ".json":
        frame.write_json(path)
    else:
        frame.write_ndjson(path)

    result = read(path, require_labels=True)

    assert result.rows_in == 4 and result.quarantined.height == 0
    assert result.source == str(path)
    expected = [
        schema.TRANSACTION_ID,
        schema.TX_TIME,
        schema.CUSTOMER_ID,
        schema.TERMINAL_ID,
        schema.AMOUNT,
        schema.IS_FRAUD,
        schema.FRAUD_SCENARIO,
    ]
    assert result.accepted.columns == expected  # TX_TIME_SECONDS is dropped
    got = result.accepted
    assert got["transaction_id"].to_list() == ["0", "1", "2", "3"]
    assert got["customer_id"].to_list() == ["596", "4961", "2", "596"]
    assert got["terminal_id"].to_list() == ["3156", "3412", "1365", "8737"]
    assert got["tx_time"].to_list() == frame["TX_DATETIME"].to_list()
    assert got["amount"].to_list() == [57.16, 81.51, 146.0, 64.49]
    assert got["is_fraud"].to_list() == [0, 0, 1, 0]
    assert got["fraud_scenario"].to_list() == [0, 0, 2, 0]


def test_canonical_columns_is_case_insensitive_and_drops_unknown() -> None:
    mapping = canonical_columns(["TX_AMOUNT", "Tx_DateTime", "card", "TX_TIME_SECONDS", "Id"])
    assert mapping == {
        "TX_AMOUNT": "amount",
        "Tx_DateTime": "tx_time",
        "card": "customer_id",
        "Id": "transaction_id",
    }


@pytest.mark.parametrize("pair", [("amount", "TX_AMOUNT"), ("card", "customer_id"), ("ID", "id")])
def test_two_columns_for_one_canonical_name_is_an_error(pair: tuple[str, str]) -> None:
    with pytest.raises(InputError, match=f"'{pair[0]}' and '{pair[1]}'"):
        canonical_columns(["x", *pair])


def test_missing_required_column_names_it_and_lists_found_columns(tmp_path: Path) -> None:
    path = tmp_path / "transactions.csv"
    path.write_text("id,time,card\n1,2,3\n")
    with pytest.raises(InputError) as info:
        read_transactions(path)
    message = str(info.value)
    assert message.startswith(f"{path}: missing required columns")
    for name in ("'tx_time'", "'terminal_id'", "'amount'", "tx_amount", "merchant_id"):
        assert name in message
    assert message.endswith("found columns: id, time, card")
    assert "'customer_id'" not in message  # `card` is an alias of it


def test_require_labels_makes_is_fraud_a_required_column() -> None:
    frame = pl.DataFrame(rows(2))
    assert checked(validate_transactions(frame)).accepted.height == 2
    with pytest.raises(InputError, match="missing required column 'is_fraud'.*tx_fraud"):
        validate_transactions(frame, require_labels=True)


def test_unknown_suffix_and_missing_file_are_input_errors(tmp_path: Path) -> None:
    path = tmp_path / "transactions.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(
        InputError, match=r"unsupported file type '\.xlsx'; expected one of .*\.csv"
    ):
        read_transactions(path)
    with pytest.raises(InputError, match="no such file"):
        read_transactions(tmp_path / "absent.csv")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
        read_transactions(tmp_path / "broken.parquet")


# --- per-row checks ------------------------------------------------------------------------

BAD_VALUES = [
    ("transaction_id", "", "transaction_id: missing value"),
    ("transaction_id", "   ", "transaction_id: missing value"),
    ("customer_id", "", "customer_id: missing value"),
    ("terminal_id", " ", "terminal_id: missing value"),
    ("tx_time", "yesterday", "tx_time: expected an ISO-8601 date-time like"),
    ("tx_time", "2018-02-30 10:00:00", "got '2018-02-30 10:00:00'"),
    ("tx_time", "1522540831", "epoch numbers are not accepted"),
    ("tx_time", "", "tx_time: missing value"),
    ("amount", "abc", "amount: expected a finite number >= 0, got 'abc'"),
    ("amount", "NaN", "amount: expected a finite number >= 0, got 'NaN'"),
    ("amount", "inf", "got 'inf'"),
    ("amount", "-0.01", "got '-0.01'"),
    ("amount", "1,000.50", "got '1,000.50'"),
    ("amount", "2e12", "amount: expected at most 1,000,000,000,000"),
    ("amount", "", "amount: missing value"),
    ("is_fraud", "2", "is_fraud: expected 0/1 or true/false, got '2'"),
    ("is_fraud", "yes", "got 'yes'"),
    ("fraud_scenario", "1.5", "fraud_scenario: expected a whole number 0-127, got '1.5'"),
]


@pytest.mark.parametrize(("field", "value", "reason"), BAD_VALUES)
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_each_bad_value_is_quarantined_with_its_field_and_row(
    tmp_path: Path, field: str, value: str, reason: str, suffix: str
) -> None:
    records = rows(4, is_fraud=["0", "1", "0", "0"], fraud_scenario=["0", "1", "0", "0"])
    records[2][field] = value
    writer = write_csv if suffix == ".csv" else write_jsonl
    result = read(writer(tmp_path / f"t{suffix}", records))

    bad = quarantined(result)
    assert list(bad) == [2]
    assert bad[2][0] == field
    assert reason in bad[2][1]
    assert json.loads(result.quarantined["raw"][0])[field] in (value, None)
    assert result.accepted["transaction_id"].to_list() == ["t0", "t1", "t3"]


def test_long_bad_values_are_cut_short_in_the_reason_but_kept_in_raw() -> None:
    long = "x" * 500
    result = checked(validate_transactions(pl.DataFrame(rows(1, amount=[long]))))
    reason = result.quarantined["reason"][0]
    assert len(reason) < 150 and reason.endswith("…'")
    assert json.loads(result.quarantined["raw"][0])["amount"] == long


def test_require_labels_quarantines_rows_without_a_label() -> None:
    frame = pl.DataFrame(rows(3, is_fraud=["1", None, " "]))
    lenient = checked(validate_transactions(frame))
    assert lenient.accepted["is_fraud"].to_list() == [1, None, None]
    strict = checked(validate_transactions(frame, require_labels=True))
    assert quarantined(strict) == {
        1: ("is_fraud", "is_fraud: missing label (expected 0/1; labels are required here)"),
        2: ("is_fraud", "is_fraud: missing label (expected 0/1; labels are required here)"),
    }


def test_several_problems_give_one_reason_listing_all_and_the_first_field() -> None:
    frame = pl.DataFrame(rows(2, customer_id=["c1", None], amount=["1", "-5"]))
    result = checked(validate_transactions(frame))
    field, reason = quarantined(result)[1]
    assert field == "customer_id"
    assert reason == (
        "customer_id: missing value (expected a non-blank id); "
        "amount: expected a finite number >= 0, got '-5'"
    )


def test_labels_accept_numbers_booleans_and_words() -> None:
    words = ["0", "1", "true", "FALSE", " True ", "1.0", None]
    result = checked(validate_transactions(pl.DataFrame(rows(7, is_fraud=words))))
    assert result.accepted["is_fraud"].to_list() == [0, 1, 1, 0, 1, 1, None]
    booleans = pl.DataFrame(rows(2)).with_columns(is_fraud=pl.Series([True, False]))
    assert checked(validate_transactions(booleans)).accepted["is_fraud"].to_list() == [1, 0]
    floats = pl.DataFrame(rows(3)).with_columns(is_fraud=pl.Series([1.0, 0.0, 0.5]))
    result = checked(validate_transactions(floats))
    assert result.accepted["is_fraud"].to_list() == [1, 0]
    assert quarantined(result) == {
        2: ("is_fraud", "is_fraud: expected 0/1 or true/false, got '0.5'")
    }


def test_channel_spellings_are_normalised_and_unknown_ones_become_null() -> None:
    spellings = {
        "POS": "card-present",
        "card_present": "card-present",
        "In-Store": "card-present",
        "CP": "card-present",
        "card present": "card-present",
        "Online": "card-not-present",
        "ECOM": "card-not-present",
        "cnp": "card-not-present",
        "Card-Not-Present": "card-not-present",
        "telepathy": None,
        "": None,
    }
    frame = pl.DataFrame(rows(len(spellings), channel=list(spellings)))
    result = checked(validate_transactions(frame))
    assert result.quarantined.height == 0
    assert result.accepted["channel"].to_list() == list(spellings.values())


def test_descriptive_fields_are_kept_with_blanks_as_null() -> None:
    frame = pl.DataFrame(
        rows(2, merchant_name=[" Café ", "  "], currency=["EUR", None], mcc=[5411, 5812])
    )
    result = checked(validate_transactions(frame))
    assert result.accepted["merchant_name"].to_list() == ["Café", None]
    assert result.accepted["currency"].to_list() == ["EUR", None]
    assert result.accepted["merchant_category"].to_list() == ["5411", "5812"]


def test_parquet_keeps_its_types_but_goes_through_the_same_checks(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "tx_id": [1, 2, 3, 4, 5],
            "timestamp": [T0] * 5,
            "card_id": [596.0, 12.5, None, 7.0, 8.0],  # pandas writes int ids with nulls as float
            "terminal_id": [1, 1, 1, 1, 1],
            "amount": [10.0, 20.0, 30.0, float("nan"), -1.0],
        }
    )
    frame.write_parquet(tmp_path / "t.parquet")
    result = read(tmp_path / "t.parquet")
    assert result.accepted["customer_id"].to_list() == ["596", "12.5"]
    bad = quarantined(result)
    assert {row: field for row, (field, _) in bad.items()} == {
        2: "customer_id",
        3: "amount",
        4: "amount",
    }
    assert "got 'NaN'" in bad[3][1]
    raw = json.loads(result.quarantined.filter(pl.col("row_number") == 3)["raw"][0])
    assert raw == {
        "tx_id": 4,
        "timestamp": "2018-04-01 00:00:31",
        "card_id": 7.0,
        "terminal_id": 1,
        "amount": "NaN",  # JSON has no NaN; the value is kept as text
    }


def test_parquet_times_with_a_fixed_utc_offset_zone_are_read_as_utc(tmp_path: Path) -> None:
    """Arrow allows a fixed offset ("+05:30") as a timestamp's zone, and pyarrow/pandas write
    it for offset-aware data; polars panicked on such a file (a PanicException, no message)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    instant = T0.replace(tzinfo=UTC)
    table = pa.table({
        "transaction_id": ["007", "7"],
        "tx_time": pa.array([instant, instant], pa.timestamp("ms", tz="+05:30")),
        "customer_id": ["c", "c"],
        "terminal_id": ["m", "m"],
        "amount": pa.array([1, 2], pa.int64()),
        "local": pa.array([instant, instant], pa.timestamp("ns", tz="-08:00")),  # not ours
    })
    pq.write_table(table, tmp_path / "t.parquet")
    result = read(tmp_path / "t.parquet")
    assert result.accepted["transaction_id"].to_list() == ["007", "7"]
    assert result.accepted["tx_time"].to_list() == [T0, T0]
    assert result.accepted["amount"].to_list() == [1.0, 2.0]


# --- time ---------------------------------------------------------------------------------

TIMES = [
    "2018-04-01T02:00:31+02:00",
    "2018-04-01T00:00:31Z",
    "2018-04-01 00:00:31",
    "2018-04-01T00:00:31.250",
    "2018-03-31T19:30:31.123456-04:30",
    "2018-04-01 05:30:31+05:30",
    "2018-04-01T00:00:31.5+00:00",
    "2018-04-01T03:00:31+0300",
    "2018-04-01T00:00",
    "2018-04-01T02:00+02:00",  # no seconds: the general parser, not a fixed format
    "2018-04-01",
]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_timestamps_with_offsets_are_converted_to_naive_utc(tmp_path: Path, suffix: str) -> None:
    def utc(text: str) -> datetime:  # reference: the standard library's ISO-8601 parser
        parsed = datetime.fromisoformat(text)
        return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo else parsed

    writer = write_csv if suffix == ".csv" else write_jsonl
    result = read(writer(tmp_path / f"t{suffix}", rows(len(TIMES), tx_time=TIMES)))
    assert result.quarantined.height == 0
    assert result.accepted["tx_time"].to_list() == [utc(t) for t in TIMES]
    assert result.accepted["tx_time"][0] == T0  # by hand: 02:00:31 at +02:00


def test_less_common_iso_spellings_are_parsed_by_hand_checked_values() -> None:
    texts = [
        "2018-04-01 00:00:31.123456 UTC",
        "2018-04-01T00:00:31,5Z",
        "2018-04-01 02:00:31.25 +02:00",
        "2018-03-31t23:00:31.0000019-01",
    ]
    result = checked(validate_transactions(pl.DataFrame(rows(4, tx_time=texts))))
    assert result.accepted["tx_time"].to_list() == [
        T0 + timedelta(microseconds=123456),
        T0 + timedelta(microseconds=500000),
        T0 + timedelta(microseconds=250000),
        T0 + timedelta(microseconds=1),  # beyond microseconds is truncated
    ]


def test_utc_offsets_beyond_a_day_or_sixty_minutes_are_quarantined_not_shifted() -> None:
    """An offset of +99:00 or +05:75 is a typo, not a time zone: it used to shift the time by
    days (2018-04-01T00:00:31+99:00 became 2018-03-28T01:00:31) and be accepted."""
    texts = ["2018-04-01T00:00:31+99:00", "2018-04-01T00:00:31+05:75", "2018-04-01T00:00:31+2400",
             "2018-04-01T00:00:31-23:59", "2018-04-01T14:00:31+14:00", "2018-04-01T00:00:31+0500",
             "2018-04-01T00:00+24"]
    result = checked(validate_transactions(pl.DataFrame(rows(len(texts), tx_time=texts))))
    assert result.accepted["tx_time"].to_list() == [
        T0 + timedelta(hours=23, minutes=59), T0, T0 - timedelta(hours=5)]
    assert result.quarantined["row_number"].to_list() == [0, 1, 2, 6]
    assert result.quarantined["field"].to_list() == ["tx_time"] * 4
    assert result.quarantined["reason"][0] == (
        "tx_time: expected an ISO-8601 date-time like 2018-04-01T00:00:31Z, got "
        "'2018-04-01T00:00:31+99:00'")


def test_aware_and_coarse_datetime_columns_become_naive_utc_microseconds() -> None:
    paris = pl.Series([datetime(2018, 4, 1, 2, 0, 31)]).dt.replace_time_zone("Europe/Paris")
    frame = pl.DataFrame(rows(1)).with_columns(tx_time=paris)
    assert checked(validate_transactions(frame)).accepted["tx_time"].to_list() == [T0]
    nanos = pl.DataFrame(rows(1)).with_columns(tx_time=pl.Series([T0]).cast(pl.Datetime("ns")))
    assert checked(validate_transactions(nanos)).accepted["tx_time"].dtype == pl.Datetime("us")
    dates = pl.DataFrame(rows(1)).with_columns(tx_time=pl.Series([T0.date()]))
    got = checked(validate_transactions(dates)).accepted["tx_time"].to_list()
    assert got == [datetime(2018, 4, 1)]


def test_integer_epoch_times_are_quarantined_not_guessed() -> None:
    frame = pl.DataFrame(rows(2)).with_columns(tx_time=pl.Series([1522540831, 1522540831000]))
    result = checked(validate_transactions(frame))
    assert result.accepted.height == 0
    assert all("epoch numbers are not accepted" in r for r in result.quarantined["reason"])


def test_times_outside_plausible_years_are_quarantined() -> None:
    """Year 0001 with an offset became year 0, and 9999-12-31 has no room for the label
    delay: both were accepted, and Python (to_list, isoformat) cannot hold them."""
    texts = ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59Z", "1900-01-01", "2200-01-01",
             "1969-07-20T20:17:40Z", "2100-01-01T00:00:00", "1970-01-01T00:00:00+01:00"]
    result = checked(validate_transactions(pl.DataFrame(rows(len(texts), tx_time=texts))))
    assert result.accepted["tx_time"].to_list() == [
        datetime(1969, 7, 20, 20, 17, 40), datetime(2100, 1, 1), datetime(1969, 12, 31, 23)]
    assert result.quarantined["row_number"].to_list() == [0, 1, 2, 3]
    assert result.quarantined["field"].to_list() == ["tx_time"] * 4
    assert result.quarantined["reason"][2] == (
        "tx_time: expected a date-time from 1950-01-01 to before 2200-01-01, got '1900-01-01'")
    aware = pl.Series([datetime(1, 1, 1, tzinfo=UTC)]).dt.replace_time_zone("UTC")
    frame = pl.DataFrame(rows(1)).with_columns(tx_time=aware)
    assert checked(validate_transactions(frame)).quarantined["field"].to_list() == ["tx_time"]


def test_negative_zero_amounts_are_zero() -> None:
    result = checked(validate_transactions(pl.DataFrame(rows(3, amount=["-0", "-0.00", "+0"]))))
    assert [math.copysign(1, a) for a in result.accepted["amount"]] == [1.0, 1.0, 1.0]


# --- duplicates ---------------------------------------------------------------------------


def test_duplicate_ids_keep_the_first_occurrence() -> None:
    ids = ["a", "b", "a", "c", "a", "b"]
    frame = pl.DataFrame(rows(6, transaction_id=ids, amount=["1", "2", "3", "4", "5", "6"]))
    result = checked(validate_transactions(frame))
    assert result.accepted.select("transaction_id", "amount").rows() == [
        ("a", 1.0),
        ("b", 2.0),
        ("c", 4.0),
    ]
    assert quarantined(result) == {
        2: ("transaction_id", "transaction_id: 'a' duplicates row 0, which is kept"),
        4: ("transaction_id", "transaction_id: 'a' duplicates row 0, which is kept"),
        5: ("transaction_id", "transaction_id: 'b' duplicates row 1, which is kept"),
    }


def test_a_duplicate_of_a_quarantined_row_is_kept() -> None:
    frame = pl.DataFrame(rows(3, transaction_id=["a", "a", "a"], amount=["-1", "2", "3"]))
    result = checked(validate_transactions(frame))
    assert result.accepted["amount"].to_list() == [2.0]
    assert [(r, f) for r, (f, _) in quarantined(result).items()] == [
        (0, "amount"),
        (2, "transaction_id"),
    ]
    assert "duplicates row 1" in quarantined(result)[2][1]


def test_ids_are_compared_after_trimming_and_float_ids_after_dropping_dot_zero() -> None:
    frame = pl.DataFrame(rows(2, transaction_id=[" 7", "7 "]))
    assert checked(validate_transactions(frame)).accepted["transaction_id"].to_list() == ["7"]
    floats = pl.DataFrame(rows(2)).with_columns(transaction_id=pl.Series([7.0, 7.0]))
    result = checked(validate_transactions(floats))
    assert result.accepted["transaction_id"].to_list() == ["7"]


# --- JSON lines ---------------------------------------------------------------------------


def test_invalid_json_lines_are_quarantined_not_fatal(tmp_path: Path) -> None:
    good = rows(3)
    lines = [
        json.dumps(good[0]),
        '{"transaction_id": "x", "amount": ',  # cut off
        "[1, 2]",
        "",  # blank lines are not records
        "42",
        json.dumps(good[1]),
        b"\xff\xfe".decode("latin-1"),
        json.dumps(good[2]),
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = read(path)
    assert result.rows_in == 7
    assert result.accepted["transaction_id"].to_list() == ["t0", "t1", "t2"]
    bad = quarantined(result)
    assert sorted(bad) == [1, 2, 3, 5]
    assert {field for field, _ in bad.values()} == {"row"}
    assert bad[1][1].startswith("invalid JSON: Expecting value")
    assert bad[2][1] == "invalid JSON: expected an object, got an array"
    assert bad[3][1] == "invalid JSON: expected an object, got a number"
    raws = dict(zip(result.quarantined["row_number"], result.quarantined["raw"], strict=True))
    assert json.loads(raws[1]) == lines[1]  # unparseable text is kept as a JSON string
    assert json.loads(raws[2]) == [1, 2]


def test_json_ids_read_the_same_on_the_line_by_line_path(tmp_path: Path) -> None:
    records = rows(3, transaction_id=[5, 5.0, 6.5])
    path = tmp_path / "t.jsonl"
    path.write_text("not json\n" + "".join(json.dumps(r) + "\n" for r in records))
    result = read(path)
    assert result.accepted["transaction_id"].to_list() == ["5", "6.5"]
    assert quarantined(result)[2] == (
        "transaction_id",
        "transaction_id: '5' duplicates row 1, which is kept",
    )


def test_long_numeric_json_ids_keep_every_digit_beside_a_float_id(tmp_path: Path) -> None:
    """One float among integer ids makes polars read the column as floats: 19-digit card and
    transaction ids would silently change. Each id must keep the digits of its own line."""
    long_ids = [4_000_000_000_000_000_001, 4_000_000_000_000_000_002]
    records = rows(3, transaction_id=[*long_ids, 7.5], customer_id=[*long_ids, 3.25])
    result = read(write_jsonl(tmp_path / "t.jsonl", records))
    assert result.accepted.height == 3
    assert result.accepted["transaction_id"].to_list() == [str(i) for i in long_ids] + ["7.5"]
    assert result.accepted["customer_id"].to_list() == [str(i) for i in long_ids] + ["3.25"]


def test_mixed_type_json_amounts_are_parsed_one_by_one(tmp_path: Path) -> None:
    amounts = [12, "12.5", "abc", 1e3, True, None, [1], " 7 "]
    records = rows(len(amounts))
    for record, amount in zip(records, amounts, strict=True):
        record["amount"] = amount
    result = read(write_jsonl(tmp_path / "t.jsonl", records))
    assert result.accepted["amount"].to_list() == [12.0, 12.5, 1000.0, 7.0]
    bad = quarantined(result)
    assert sorted(bad) == [2, 4, 5, 6]
    assert bad[2][1] == "amount: expected a finite number >= 0, got 'abc'"
    assert bad[4][1] == "amount: expected a finite number >= 0, got 'true'"
    assert bad[5][1] == "amount: missing value (expected a finite number >= 0)"


@pytest.mark.parametrize("values", [["shop", {"a": 1}], [{"b": [2]}, {"a": 1}]])
def test_nested_json_values_are_read_as_json_text(tmp_path: Path, values: list) -> None:
    records = rows(2, merchant_name=values)
    result = read(write_jsonl(tmp_path / "t.jsonl", records))
    got = result.accepted["merchant_name"].to_list()
    assert got[0] == values[0] if isinstance(values[0], str) else json.loads(got[0]) == values[0]
    assert json.loads(got[1]) == values[1]


def test_json_lines_without_a_single_object_are_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("[1]\nnot json\n")
    with pytest.raises(InputError, match="no record is a JSON object"):
        read_transactions(path)


def test_json_array_files_and_json_lines_saved_as_json(tmp_path: Path) -> None:
    records = rows(3)
    array = tmp_path / "array.json"
    array.write_text(json.dumps([records[0], "oops", records[1], records[2]]))
    result = read(array)
    assert result.rows_in == 4 and quarantined(result)[1][0] == "row"
    lines = write_jsonl(tmp_path / "lines.json", records)
    assert read(lines).accepted.height == 3
    (tmp_path / "object.json").write_text('{"transactions": []}')
    with pytest.raises(InputError, match="expected a JSON array"):
        read_transactions(tmp_path / "object.json")


# --- CSV specifics --------------------------------------------------------------------------


def test_latin1_csv_is_decoded_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    text = "id,tx_time,card,terminal_id,amount,merchant_name\nt1,2018-04-01,c,m,5,Café Müller\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.warns(IngestWarning, match="not valid UTF-8.*decoded as"):
        result = read(path)
    assert result.accepted["merchant_name"].to_list() == ["Café Müller"]


def test_utf8_bom_and_semicolons_are_understood(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    text = "\ufeffid;tx_time;card;terminal_id;amount\nt1;2018-04-01;c;m;5.5\n"
    path.write_bytes(text.encode("utf-8"))
    result = read(path)
    assert result.accepted.row(0) == ("t1", datetime(2018, 4, 1), "c", "m", 5.5)


def test_separator_is_found_outside_quoted_column_names(tmp_path: Path) -> None:
    """A quoted header name holding commas ("Amount (EUR, net)") outvoted the semicolons."""
    path = tmp_path / "t.csv"
    fee = '"fee (EUR, net, incl. tax, per unit, before discount, rounded)"'
    path.write_text(f'"id";"tx_time";"card";"terminal_id";"amount";{fee}\n'
                    '"t1";"2018-04-01";"c";"m";"5";"0,5"\n')
    result = read(path)
    assert result.accepted.row(0) == ("t1", datetime(2018, 4, 1), "c", "m", 5.0)


def test_csv_rows_with_extra_fields_are_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "id,tx_time,card,terminal_id,amount\n"
        "t1,2018-04-01,c,m,5\n"
        "t2,2018-04-01,c,m,5,surprise\n"
        "t3,2018-04-01,c,m\n"
        "\n"
    )
    result = read(path)
    assert result.accepted["transaction_id"].to_list() == ["t1"]
    assert quarantined(result) == {
        1: ("row", "malformed CSV row: 6 fields, header has 5"),
        2: ("amount", "amount: missing value (expected a finite number >= 0)"),
        3: ("row", "empty record: no values"),
    }
    assert json.loads(result.quarantined["raw"][0]) == [
        "t2",
        "2018-04-01",
        "c",
        "m",
        "5",
        "surprise",
    ]


def test_an_unclosed_quote_is_named_as_such(tmp_path: Path) -> None:
    """A quote never closed runs to the end of the file, taking the rows after it into one
    field: the reason said "terminal_id: missing value", hiding why two rows became one."""
    path = tmp_path / "t.csv"
    path.write_text('id,tx_time,card,terminal_id,amount\r\n'
                    't1,2018-04-01,c,m,5\r\n'
                    't2,2018-04-01,"c,m,5\r\n'
                    't3,2018-04-01,c,m,5\r\n', newline="")
    result = read(path)
    assert result.accepted["transaction_id"].to_list() == ["t1"]
    assert quarantined(result) == {1: ("row", (
        "malformed CSV row: the quote opening field 'card' is never closed, so the 1 line "
        "after it was read into that field; expected a closing quote"))}
    assert "t3,2018-04-01" in json.loads(result.quarantined["raw"][0])["card"]
    closed = tmp_path / "closed.csv"  # a closed multi-line value last is no such case
    closed.write_text('id,tx_time,card,terminal_id,amount\nt1,2018-04-01,"c\nd"', newline="")
    assert quarantined(read(closed))[0][0] == "terminal_id"


def test_blank_csv_lines_are_empty_records(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("id,tx_time,card,terminal_id,amount\nt1,2018-04-01,c,m,5\n\n,,,,\n")
    result = read(path)
    assert result.accepted.height == 1
    assert quarantined(result) == {
        1: ("row", "empty record: no values"),
        2: ("row", "empty record: no values"),
    }


def test_header_only_files_are_empty_results_and_empty_files_are_errors(tmp_path: Path) -> None:
    header = tmp_path / "header.csv"
    header.write_text("TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT\n")
    result = read(header)
    assert result.counts == {"rows_in": 0, "accepted": 0, "quarantined": 0}
    assert result.accepted.columns == list(schema.REQUIRED)

    handbook_frame().clear().write_parquet(tmp_path / "empty.parquet")
    assert read(tmp_path / "empty.parquet", require_labels=True).rows_in == 0

    empties = {
        "empty.csv": b"",
        "empty.jsonl": b"",
        "blank.jsonl": b"\n  \n",
        "empty.json": b"",
        "array.json": b"[]",
        "zero.parquet": b"",
    }
    for name, content in empties.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match="empty"):
            read_transactions(tmp_path / name)
    (tmp_path / "blank.csv").write_text("\n\n")
    with pytest.raises(InputError, match="no header row"):
        read_transactions(tmp_path / "blank.csv")


# --- quarantine files -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_write_quarantine_round_trips(tmp_path: Path, suffix: str) -> None:
    records = rows(
        4, amount=["1", "x", "2", "-1"], merchant_name=["a", 'quote " and,comma', "", ""]
    )
    records[0]["merchant_name"] = "line\nbreak"
    result = checked(validate_transactions(pl.DataFrame(records)))
    assert result.quarantined.height == 2

    target = tmp_path / "out" / f"quarantine{suffix}"
    assert write_quarantine(result, target) == target
    back = read_quarantine(target)
    assert back.equals(result.quarantined)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp files left
    assert json.loads(back["raw"][0])["merchant_name"] == 'quote " and,comma'

    with pytest.raises(ValueError, match="use .parquet/.csv"):
        write_quarantine(result, tmp_path / "quarantine.txt")


# --- properties -----------------------------------------------------------------------------

VALUE = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["2018-04-01T00:00:31Z", "2018-04-01 00:00:31+01:00", "12.5", "0", "1", " "]),
)
NAMES = {
    "transaction_id": ["transaction_id", "TRANSACTION_ID", "tx_id"],
    "tx_time": ["tx_time", "TX_DATETIME", "timestamp"],
    "customer_id": ["customer_id", "CUSTOMER_ID", "card"],
    "terminal_id": ["terminal_id", "TERMINAL_ID", "merchant_id"],
    "amount": ["amount", "TX_AMOUNT"],
    "is_fraud": ["is_fraud", "TX_FRAUD"],
    "channel": ["channel"],
}
OFFSETS = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
MOMENTS = st.datetimes(datetime(1971, 1, 1), datetime(2100, 1, 1))
# Values valid by construction, so rows made only of them must be accepted.
GOOD = {
    "tx_time": st.one_of(
        MOMENTS.map(datetime.isoformat),
        st.builds(lambda d, tz: d.replace(tzinfo=tz).isoformat(), MOMENTS, OFFSETS),
        st.sampled_from(TIMES),
    ),
    "customer_id": st.text("abcXYZ0129-_", min_size=1, max_size=8),
    "terminal_id": st.integers(0, 10**6),
    "amount": st.one_of(st.floats(0, 1e9), st.floats(0, 1e9).map(repr)),
    "is_fraud": st.sampled_from([0, 1, "0", "1", True, False, "true", "FALSE", None]),
    "channel": st.sampled_from(["pos", "CNP", "online", "card_present", "other", None]),
}
LABELS = {"0": 0, "1": 1, "true": 1, "false": 0}
CHANNELS = {"pos": "card-present", "cnp": "card-not-present", "online": "card-not-present"}
CHANNELS["card_present"] = "card-present"


def expected_value(field: str, value):
    """What a good value must become, by a reference independent of the code under test."""
    if field == "tx_time":
        parsed = datetime.fromisoformat(value)
        return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo else parsed
    if field == "amount":
        return float(value)
    if field == "is_fraud":
        return None if value is None else LABELS[str(value).lower()]
    if field == "channel":
        return None if value is None else CHANNELS.get(value.lower())
    return str(value)


@st.composite
def tables(draw) -> tuple[list[str], list[str], list[list], list[bool]]:
    """Header, canonical fields, rows, and which rows are good by construction."""
    fields = [f for f in NAMES if f in schema.REQUIRED or draw(st.booleans())]
    if draw(st.integers(0, 9)) == 0:  # now and then a required column is missing
        fields.remove(draw(st.sampled_from(list(schema.REQUIRED))))
    header = [draw(st.sampled_from(NAMES[f])) for f in fields]
    few_ids = st.sampled_from(["a", "b", "c", 1, 2.0])  # few ids: duplicates are common
    records, good = [], []
    for i in range(draw(st.integers(0, 12))):
        good.append(draw(st.booleans()))
        if good[-1]:  # ids no other row can have
            records.append(
                [f"good-{i}" if f == "transaction_id" else draw(GOOD[f]) for f in fields]
            )
        else:  # a mix of good values, few ids and anything at all
            mixed = {f: st.one_of(GOOD.get(f, few_ids), VALUE) for f in fields}
            records.append([draw(mixed[f]) for f in fields])
    return header, fields, records, good


def check_property(result_or_error, fields: list[str], records: list[list], good: list[bool]):
    if isinstance(result_or_error, InputError):
        assert not set(schema.REQUIRED) <= set(fields) or not records
        return
    result = checked(result_or_error)
    assert result.rows_in == len(records)
    accepted = result.accepted
    assert accepted["transaction_id"].is_unique().all()
    for field in schema.REQUIRED:
        assert accepted[field].null_count() == 0
    assert all(math.isfinite(a) and 0 <= a <= MAX_AMOUNT for a in accepted["amount"])
    # Accepted rows keep the file's order, so they line up with the rows not quarantined.
    bad = set(result.quarantined["row_number"])
    kept = [i for i in range(len(records)) if i not in bad]
    assert not {i for i, g in enumerate(good) if g} & bad  # good rows are all accepted
    for i, row in zip(kept, accepted.iter_rows(named=True), strict=True):
        if good[i]:
            for field, value in zip(fields, records[i], strict=True):
                assert row[field] == expected_value(field, value), (field, value)


def attempt(path: Path):
    try:
        return read_transactions(path)
    except InputError as error:
        return error


PROPERTY = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(table=tables())
def test_property_random_csv_loads_or_raises_input_error(tmp_path: Path, table) -> None:
    header, fields, records, good = table
    path = tmp_path / "random.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if v is None else str(v) for v in r] for r in records])
    check_property(attempt(path), fields, records, good)


@PROPERTY
@given(table=tables())
def test_property_random_jsonl_loads_or_raises_input_error(tmp_path: Path, table) -> None:
    header, fields, records, good = table
    path = tmp_path / "random.jsonl"
    path.write_text("".join(json.dumps(dict(zip(header, r, strict=True))) + "\n" for r in records))
    check_property(attempt(path), fields, records, good)


# --- the real handbook file -----------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.skipif(not HANDBOOK_RAW.exists(), reason=f"shared data not found at {HANDBOOK_RAW}")
def test_real_handbook_raw_file_is_accepted_whole() -> None:
    result = read(HANDBOOK_RAW, require_labels=True)
    assert result.counts == {"rows_in": 1_169_723, "accepted": 1_169_723, "quarantined": 0}
    accepted = result.accepted
    assert accepted["transaction_id"].n_unique() == 1_169_723
    # README: 0.81 % fraud, 2018-04-01 .. 2018-07-31
    assert accepted["is_fraud"].mean() == pytest.approx(0.0081, abs=0.0005)
    assert accepted["tx_time"].min() >= datetime(2018, 4, 1)
    assert accepted["tx_time"].max() < datetime(2018, 8, 1)
