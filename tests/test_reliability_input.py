"""Bad input, property-based: any file either loads, with every bad row quarantined and named,
or stops with an InputError naming the file and what was expected. Never another exception,
never a traceback from the CLI, never a silent drop (rows in = accepted + quarantined).

Beyond tests/test_ingest.py's properties: arbitrary and corrupted bytes, UTF-16/cp1252/latin-1
text, CR / CRLF line ends and other separators, hostile ids (NUL, SQL, unicode, duplicates),
huge / negative / NaN / textual amounts, time zones and impossible times, odd Parquet types;
and the whole CLI (features, index build, score) run on such files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import uuid
import warnings
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import schema
from pipeline.features import compute_features
from pipeline.index import FraudIndex
from pipeline.ingest import MAX_AMOUNT, IngestResult, InputError, read_transactions
from pipeline.ledger import Ledger
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig

sys.path.insert(0, str(Path(__file__).parent))
from reliability_workers import run_cli  # noqa: E402

PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
FIELDS = set(schema.DTYPES) | {"row"}
ROW_REASONS = ("empty record", "malformed CSV row", "invalid JSON")
HEADER = ["transaction_id", "tx_time", "customer_id", "terminal_id", "amount", "merchant_name"]


def check(result: IngestResult, records: int | None = None) -> IngestResult:
    """Nothing lost, everything named: the invariants of any successful read."""
    assert result.rows_in == result.accepted.height + result.quarantined.height
    if records is not None:
        assert result.rows_in == records
    q = result.quarantined
    assert sorted(q["row_number"]) == sorted(set(q["row_number"]))
    assert q["row_number"].is_between(0, result.rows_in - 1).all()
    for field, reason, raw in q.select("field", "reason", "raw").iter_rows():
        assert field in FIELDS
        # The reason names the field (or says why the whole record is unreadable).
        assert reason.startswith(f"{field}:") or (field == "row" and reason.startswith(ROW_REASONS))
        json.loads(raw)
    a = result.accepted
    if a.height:
        assert a["transaction_id"].is_unique().all()
        for field in schema.REQUIRED:
            assert a[field].null_count() == 0
        for field in ("transaction_id", "customer_id", "terminal_id"):
            assert not a[field].str.contains("\x00", literal=True).any()
        amounts = a["amount"].to_list()
        assert all(math.isfinite(x) and 0 <= x <= MAX_AMOUNT for x in amounts)
    return result


def attempt(path: Path, **kwargs) -> IngestResult | InputError:
    """Read; only an InputError naming the file may stop it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IngestWarning for decoded files is fine here
        try:
            return read_transactions(path, **kwargs)
        except InputError as error:
            assert str(error).startswith(f"{path}: "), error
            return error


# --- any bytes at all -------------------------------------------------------------------------

SUFFIXES = st.sampled_from([".csv", ".jsonl", ".json", ".parquet"])
VALID_CSV = (b"transaction_id,tx_time,customer_id,terminal_id,amount\n"
             b"1,2020-01-01T00:00:00Z,c1,t1,10.5\n2,2020-01-02 10:00,c2,t2,3\n")
VALID_JSONL = b'{"transaction_id":1,"tx_time":"2020-01-01","customer_id":"c","terminal_id":"t",' \
              b'"amount":1}\n'


@st.composite
def corrupted(draw) -> bytes:
    """A valid file with bytes flipped, inserted or cut off."""
    data = bytearray(draw(st.sampled_from([VALID_CSV, VALID_JSONL])))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "cut"]))
        if action == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[at:]
    return bytes(data)


@PROPERTY
@given(data=st.one_of(st.binary(max_size=300), corrupted()), suffix=SUFFIXES)
def test_any_bytes_load_or_stop_with_a_message(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"input{suffix}"
    path.write_bytes(data)
    for labels in (False, True):
        result = attempt(path, require_labels=labels)
        if isinstance(result, IngestResult):
            check(result)


# --- hostile tables, in any encoding, line end and separator --------------------------------

AMOUNTS_BAD = st.sampled_from(["-5", "-0.01", "NaN", "nan", "inf", "-inf", "1e400", "1e13",
                               "12,5", "$5", "0x10", "1_000", "", " ", "twelve", "1e", "--1"])
AMOUNTS_GOOD = st.one_of(st.floats(0, 1e9).map(repr), st.integers(0, 10**9).map(str),
                         st.sampled_from(["0", "-0", " 12.50 ", "1e3", "1E+2", ".5", "5."]))
OFFSETS = st.sampled_from(["Z", "+00:00", "+14:00", "-12:00", "+05:45", "-03:30", "+0100",
                           " UTC", ""])
MOMENTS = st.datetimes(datetime(1971, 1, 2), datetime(2099, 12, 30))
TIMES_GOOD = st.builds(lambda d, sep, tz: d.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + tz,
                       MOMENTS, st.sampled_from(["T", " "]), OFFSETS)
TIMES_BAD = st.sampled_from(["2020-02-30", "2020-13-01", "2020-01-01T25:00", "1577836800",
                             "yesterday", "01/02/2020", "", "2020-01-01T10:00+25:00"])
SQL = ["'; DROP TABLE decisions; --", "1 OR 1=1", "x'); DELETE FROM batches;--",
       "Robert'); DROP TABLE quarantine;--", '"; SELECT pg_sleep(1); --']


def ids(alphabet: str) -> st.SearchStrategy[str]:
    return st.one_of(st.text(alphabet, min_size=1, max_size=10).filter(str.strip),
                     st.sampled_from(SQL))


@st.composite
def hostile_files(draw):
    """(bytes, suffix, records, good): a CSV or JSON-lines file and which rows are valid by
    construction (they must be accepted, with their values)."""
    kind = draw(st.sampled_from(["csv", "csv", "jsonl"]))
    encoding = "utf-8" if kind == "jsonl" else draw(
        st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1"]))
    wide = encoding in ("utf-8", "utf-8-sig", "utf-16")
    alphabet = "abcXYZ019-_ éüßñ" + ("€😀漢\u202e" if wide else "")
    records, good = [], []
    for i in range(draw(st.integers(0, 10))):
        ok = draw(st.booleans())
        if ok:
            row = [f"good-{i}-{draw(ids(alphabet))}", draw(TIMES_GOOD), draw(ids(alphabet)),
                   draw(ids(alphabet)), draw(AMOUNTS_GOOD), draw(ids(alphabet))]
        else:
            row = [draw(st.one_of(st.sampled_from(["dup", "dup", "", "x\x00y", "  "]),
                                  ids(alphabet))),
                   draw(st.one_of(TIMES_BAD, TIMES_GOOD)), draw(ids(alphabet)),
                   draw(st.one_of(ids(alphabet), st.just(""))),
                   draw(st.one_of(AMOUNTS_BAD, AMOUNTS_GOOD)), draw(ids(alphabet))]
            # A row this broad can be valid by chance; only rows valid by construction count.
        records.append(row)
        good.append(ok)
    if kind == "jsonl":
        lines = [json.dumps(dict(zip(HEADER, r, strict=True))) for r in records]
        return ("\n".join(lines) + "\n").encode(), ".jsonl", records, good
    separator = draw(st.sampled_from([",", ";", "\t"]))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=separator, lineterminator=newline)
    writer.writerow(HEADER)
    writer.writerows(records)
    return buffer.getvalue().encode(encoding), ".csv", records, good


def parse_amount(text: str) -> float | None:
    """A reference parse of a plain decimal amount, independent of the code under test."""
    text = text.strip()
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        return None
    value = float(text)
    return value + 0.0 if math.isfinite(value) and 0 <= value <= MAX_AMOUNT else None


@PROPERTY
@given(file=hostile_files())
def test_hostile_tables_load_with_every_bad_row_named(tmp_path: Path, file) -> None:
    data, suffix, records, good = file
    path = tmp_path / f"hostile{suffix}"
    path.write_bytes(data)
    result = attempt(path)
    if isinstance(result, InputError):
        # Only a file without a header may fail as a whole: JSON lines with no record.
        assert suffix == ".jsonl" and not records and "empty" in str(result), result
        return
    check(result, records=len(records))
    bad_rows = set(result.quarantined["row_number"])
    accepted = iter(result.accepted.iter_rows(named=True))
    for i, (row, ok) in enumerate(zip(records, good, strict=True)):
        if parse_amount(row[4]) is None or "\x00" in row[0] or not row[0].strip():
            assert i in bad_rows, (i, row)
        if ok:  # valid by construction, and its id is unique: accepted, values intact
            assert i not in bad_rows, (i, row, result.quarantined.filter(
                pl.col("row_number") == i)["reason"].to_list())
        if i not in bad_rows:
            got = next(accepted)
            if ok:
                assert got["transaction_id"] == row[0].strip()
                assert got["customer_id"] == row[2].strip()
                assert got["merchant_name"] == row[5].strip()
                assert got["amount"] == parse_amount(row[4])
                moment = datetime.fromisoformat(row[1].replace(" UTC", "Z"))
                if moment.tzinfo is not None:
                    moment = moment.astimezone(UTC).replace(tzinfo=None)
                assert got["tx_time"] == moment


# --- Parquet with every kind of column type --------------------------------------------------

PARQUET_COLUMNS = {
    "int": (pl.Int64, st.integers(-(2**63), 2**63 - 1)),
    "uint": (pl.UInt64, st.integers(0, 2**64 - 1)),
    "float": (pl.Float64, st.floats(allow_nan=True, allow_infinity=True)),
    "f32": (pl.Float32, st.floats(width=32, allow_nan=True, allow_infinity=True)),
    "text": (pl.String, st.text(max_size=8)),
    "bool": (pl.Boolean, st.booleans()),
    "naive": (pl.Datetime("us"), MOMENTS),
    "aware": (pl.Datetime("us", "Asia/Kathmandu"), MOMENTS),
    "ns": (pl.Datetime("ns"), MOMENTS),
    "date": (pl.Date, st.dates(date(1971, 1, 2), date(2099, 1, 1))),
    "time": (pl.Time, st.times()),
    "duration": (pl.Duration("us"), st.timedeltas(timedelta(0), timedelta(days=9))),
    "decimal": (pl.Decimal(20, 4), st.decimals(-(10**10), 10**10, places=4,
                                                 allow_nan=False, allow_infinity=False)),
    "categorical": (pl.Categorical, st.sampled_from(["a", "b", "c"])),
    "null": (pl.Null, st.none()),
    "list": (pl.List(pl.Int64), st.lists(st.integers(0, 9), max_size=2)),
    "binary": (pl.Binary, st.binary(max_size=4)),
}


@st.composite
def parquet_frames(draw) -> pl.DataFrame:
    n = draw(st.integers(0, 6))
    columns = {}
    for name in (*schema.REQUIRED, "is_fraud"):
        if name == "is_fraud" and draw(st.booleans()):
            continue
        dtype, values = PARQUET_COLUMNS[draw(st.sampled_from(sorted(PARQUET_COLUMNS)))]
        nulls = st.one_of(st.none(), values) if dtype != pl.Null else values
        column = [draw(nulls) for _ in range(n)]
        if dtype == pl.Decimal(20, 4):
            column = [None if v is None else Decimal(v) for v in column]
        columns[name] = pl.Series(name, column, dtype=dtype)
    return pl.DataFrame(columns)


@PROPERTY
@given(frame=parquet_frames())
def test_parquet_of_any_column_types_loads_or_names_the_column(tmp_path: Path, frame) -> None:
    path = tmp_path / "typed.parquet"
    frame.write_parquet(path)
    for labels in (False, True):
        result = attempt(path, require_labels=labels)
        if isinstance(result, InputError):
            message = str(result)
            assert "missing required column" in message or "holds" in message, message
        else:
            check(result, records=frame.height)


# --- the CLI on the same files: a message and exit 2, never a traceback -----------------------

def counts_line(stderr: str) -> tuple[int, int, int]:
    found = re.search(r"rows in ([\d,]+) = \w+ ([\d,]+) \+ quarantined ([\d,]+)", stderr)
    assert found, stderr
    return tuple(int(g.replace(",", "")) for g in found.groups())


@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-index")
    data = compute_features(generate(SyntheticConfig(n_customers=60, n_terminals=120, n_days=12,
                                                     seed=2)))
    FraudIndex.build(data, encoder=None, vector_config=VectorConfig(text_dim=0)).save("cards", root)
    return root


def any_file():
    return st.one_of(
        hostile_files().map(lambda f: (f[0], f[1], len(f[2]))),
        st.tuples(st.one_of(st.binary(max_size=200), corrupted()), SUFFIXES, st.none()),
    )


@settings(PROPERTY, max_examples=30)
@given(file=any_file())
def test_cli_on_bad_files_prints_a_message_never_a_traceback(tmp_path: Path, small_index: Path,
                                                            file) -> None:
    data, suffix, records = file
    path = tmp_path / f"in{suffix}"
    path.write_bytes(data)
    db = f"sqlite:///{tmp_path / f'ledger-{uuid.uuid4().hex}.sqlite'}"  # fresh per example
    runs = {
        "features": ("features", "--input", str(path), "--output", str(tmp_path / "f.parquet")),
        "score": ("score", "--input", str(path), "--index", "cards", "--root", str(small_index),
                  "--output", str(tmp_path / "s.parquet"), "--db", db, "--batch-id", "b"),
    }
    for command, args in runs.items():
        code, out, err = run_cli(*args)
        assert "Traceback" not in out + err
        assert code in (0, 2), (command, code, out, err)
        if code == 2:
            assert err.lstrip().startswith("error:"), err
            continue
        rows_in, kept, quarantined = counts_line(err)
        assert rows_in == kept + quarantined
        if records is not None:
            assert rows_in == records
        if command == "score":
            with Ledger(db) as ledger:
                assert ledger.verify().ok
                assert ledger.count() == kept
                assert len(ledger.quarantined("b")) == quarantined


def test_two_different_files_of_only_bad_rows_under_one_name_are_two_batches(
        tmp_path: Path, small_index: Path) -> None:
    """An inbox file named the same every day, every row bad (say, amounts with a currency
    sign): each day's file is its own batch, its bad rows in the ledger. The batch id used to
    come from the scored rows alone, so every such file got `export-e3b0c44298fc` (the hash of
    nothing) and the second one stopped on 'a batch id must name one input'."""
    db = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    header = "transaction_id,tx_time,customer_id,terminal_id,amount\n"
    days = {"mon": "1,2020-01-06T10:00:00Z,c,t,€5\n2,2020-01-06T11:00:00Z,c,t,€7\n",
            "tue": "3,2020-01-07T10:00:00Z,c,t,€9\n"}
    batches = []
    for day, body in days.items():
        path = tmp_path / day / "export.csv"
        path.parent.mkdir()
        path.write_text(header + body)
        args = ("score", "--input", str(path), "--index", "cards", "--root", str(small_index),
                "--output", str(tmp_path / day / "s.parquet"), "--db", db)
        code, out, err = run_cli(*args)
        assert code == 0, err
        assert counts_line(err) == (body.count("\n"), 0, body.count("\n"))
        batches.append(re.search(r"batch (\S+):", out).group(1))
        code, out, err = run_cli(*args)  # the same file again adds nothing
        assert code == 0 and "ledger +0 records" in out and batches[-1] in out, err
    assert batches[0] != batches[1]
    assert all(b.startswith("export-") for b in batches)
    with Ledger(db) as ledger:
        assert [len(ledger.quarantined(b)) for b in batches] == [2, 1]
        assert ledger.verify().ok


def test_score_refuses_a_neighbour_count_below_one_before_recording(
        tmp_path: Path, small_index: Path) -> None:
    """--k 0 used to record every row as a 'pass' at the prior (no neighbour consulted), and
    --k -1 stopped on numpy's 'negative dimensions are not allowed'."""
    path = tmp_path / "in.csv"
    path.write_text("transaction_id,tx_time,customer_id,terminal_id,amount\n"
                    "1,2018-04-05T10:00:00Z,1,1,5\n")
    db = tmp_path / "ledger.sqlite"
    for k in ("0", "-1"):
        code, out, err = run_cli("score", "--input", str(path), "--index", "cards", "--root",
                                 str(small_index), "--output", str(tmp_path / "s.parquet"),
                                 "--db", f"sqlite:///{db}", "--k", k)
        assert code == 2 and "Traceback" not in out + err
        assert f"--k: expected a whole number of neighbours >= 1, got {k}" in err
    assert not db.exists() and not (tmp_path / "s.parquet").exists()


def test_cli_index_build_on_unusable_history_is_a_message(tmp_path: Path) -> None:
    """No labelled row, no label column, a header with rich markup in it: messages, exit 2."""
    cases = {
        "nolabels.csv": "transaction_id,tx_time,customer_id,terminal_id,amount\n"
                        "1,2020-01-01,c,t,1\n",
        "allbad.csv": "transaction_id,tx_time,customer_id,terminal_id,amount,is_fraud\n"
                      "1,nope,c,t,-1,0\n",
        "markup.csv": "[/bold],[red]x[/red]\n1,2\n",
    }
    expected = {"nolabels.csv": "missing required column 'is_fraud'",
                "allbad.csv": "nothing to index", "markup.csv": "[/bold], [red]x[/red]"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        code, out, err = run_cli("index", "build", "--input", str(tmp_path / name), "--name",
                                 "x", "--root", str(tmp_path / "idx"), "--text-dim", "0")
        assert code == 2 and "Traceback" not in out + err, (name, out, err)
        assert expected[name] in " ".join(err.split()), (name, err)


def test_unwritable_output_and_unreadable_input_are_messages(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("transaction_id,tx_time,customer_id,terminal_id,amount\n1,2020-01-01,c,t,1\n")
    (tmp_path / "a-file").write_text("not a directory")
    code, out, err = run_cli("features", "--input", str(source), "--output",
                             str(tmp_path / "a-file" / "o.parquet"))
    assert code == 2 and err.lstrip().startswith("error:") and "Traceback" not in out + err
    assert "a-file" in err
    (tmp_path / "folder.csv").mkdir()
    code, out, err = run_cli("features", "--input", str(tmp_path / "folder.csv"), "--output",
                             str(tmp_path / "o.parquet"))
    assert code == 2 and "is a directory; expected a file" in err
    assert "Traceback" not in out + err


def test_times_keep_their_instant_across_offsets_and_bounds(tmp_path: Path) -> None:
    """The same instant in five spellings is one time; instants at the ends of the accepted
    range survive; impossible times are quarantined, naming tx_time."""
    spellings = ["2020-03-01T12:00:00Z", "2020-03-01 13:00:00+01:00", "2020-03-01T06:15-05:45",
                 "2020-03-02T02:00:00+14:00", "2020-02-29T23:59:59.999999-12:00:01"]
    rows = [f"{i},{t},c,t,1" for i, t in enumerate(spellings)]
    rows += ["10,1971-01-01T00:00:00+14:00,c,t,1", "11,2020-02-30T00:00:00Z,c,t,1",
             "12,2020-01-01T24:00:00Z,c,t,1"]
    path = tmp_path / "times.csv"
    path.write_text("transaction_id,tx_time,customer_id,terminal_id,amount\n"
                    + "\n".join(rows) + "\n")
    result = check(read_transactions(path), records=len(rows))
    times = dict(zip(result.accepted["transaction_id"], result.accepted["tx_time"], strict=True))
    noon = datetime(2020, 3, 1, 12, 0)
    assert [times[str(i)] for i in range(4)] == [noon] * 4
    assert times["10"] == datetime(1970, 12, 31, 10, 0)
    quarantined = dict(zip(result.quarantined["row_number"], result.quarantined["field"],
                           strict=True))
    assert quarantined == {4: "tx_time", 6: "tx_time", 7: "tx_time"}


# --- news readers: the same guarantees --------------------------------------------------------

NEWS_FIELDS = {"news_id", "published_at", "source", "headline", "body", "tickers", "row"}
NEWS_HEADER = ["id", "published", "source", "headline", "body", "tickers"]


def check_news(result: IngestResult, records: int | None = None) -> IngestResult:
    assert result.rows_in == result.accepted.height + result.quarantined.height
    if records is not None:
        assert result.rows_in == records
    q = result.quarantined
    assert sorted(q["row_number"]) == sorted(set(q["row_number"]))
    for field, reason, raw in q.select("field", "reason", "raw").iter_rows():
        assert field in NEWS_FIELDS
        assert reason.startswith(f"{field}:") or (field == "row" and reason.startswith(ROW_REASONS))
        json.loads(raw)
    a = result.accepted
    if a.height:
        assert a["news_id"].is_unique().all()
        for field in ("news_id", "published_at", "source", "headline"):
            assert a[field].null_count() == 0
        assert not a["news_id"].str.contains("\x00", literal=True).any()
    return result


def attempt_news(path: Path) -> IngestResult | InputError:
    from pipeline.news import read_news

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read_news(path)
        except InputError as error:
            assert str(error).startswith(f"{path}: "), error
            return error


@PROPERTY
@given(data=st.one_of(st.binary(max_size=300), corrupted()), suffix=SUFFIXES)
def test_news_readers_take_any_bytes(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"news{suffix}"
    path.write_bytes(data)
    result = attempt_news(path)
    if isinstance(result, IngestResult):
        check_news(result)


@st.composite
def hostile_news(draw):
    kind = draw(st.sampled_from(["csv", "jsonl"]))
    encoding = "utf-8" if kind == "jsonl" else draw(
        st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252"]))
    alphabet = "abcXYZ019-_ éüß" + ("€😀漢" if encoding.startswith("utf") else "")
    records, good = [], []
    for i in range(draw(st.integers(0, 8))):
        ok = draw(st.booleans())
        tickers = st.sampled_from(["AAPL", "$msft, BTC", "BRK.B|ETH", "", "[\"TSLA\"]"])
        if ok:
            row = [f"n{i}-{draw(ids(alphabet))}", draw(TIMES_GOOD), draw(ids(alphabet)),
                   draw(ids(alphabet)), draw(ids(alphabet)), draw(tickers)]
        else:
            row = [draw(st.one_of(st.sampled_from(["dup", "dup", "", "a\x00b"]), ids(alphabet))),
                   draw(st.one_of(TIMES_BAD, TIMES_GOOD)), draw(st.one_of(ids(alphabet),
                                                                          st.just(""))),
                   draw(ids(alphabet)), draw(ids(alphabet)),
                   draw(st.one_of(tickers, st.sampled_from(["not a ticker!", "[1, 2]", "[oops"])))]
        records.append(row)
        good.append(ok)
    if kind == "jsonl":
        body = "".join(json.dumps(dict(zip(NEWS_HEADER, r, strict=True))) + "\n"
                       for r in records)
        return body.encode(), ".jsonl", records, good
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"])))
    writer.writerow(NEWS_HEADER)
    writer.writerows(records)
    return buffer.getvalue().encode(encoding), ".csv", records, good


@PROPERTY
@given(file=hostile_news())
def test_hostile_news_files_load_with_every_bad_row_named(tmp_path: Path, file) -> None:
    data, suffix, records, good = file
    path = tmp_path / f"news{suffix}"
    path.write_bytes(data)
    result = attempt_news(path)
    if isinstance(result, InputError):
        assert suffix == ".jsonl" and not records and "empty" in str(result), result
        return
    check_news(result, records=len(records))
    bad_rows = set(result.quarantined["row_number"])
    accepted = iter(result.accepted.iter_rows(named=True))
    for i, (row, ok) in enumerate(zip(records, good, strict=True)):
        if "\x00" in row[0] or not row[0].strip():
            assert i in bad_rows, (i, row)
        if ok:
            assert i not in bad_rows, (i, row, result.quarantined.filter(
                pl.col("row_number") == i)["reason"].to_list())
        if i not in bad_rows:
            got = next(accepted)
            if ok:
                assert (got["news_id"], got["headline"]) == (row[0].strip(), row[3].strip())


@PROPERTY
@given(frame=parquet_frames())
def test_news_parquet_of_any_column_types_loads_or_names_the_column(tmp_path: Path,
                                                                    frame) -> None:
    renamed = frame.rename({"transaction_id": "news_id", "tx_time": "published_at",
                            "customer_id": "source", "terminal_id": "headline",
                            "amount": "tickers"})
    path = tmp_path / "news.parquet"
    renamed.drop("is_fraud", strict=False).write_parquet(path)
    result = attempt_news(path)
    if isinstance(result, InputError):
        assert "holds" in str(result) or "missing required" in str(result), result
    else:
        check_news(result, records=frame.height)
