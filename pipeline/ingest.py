"""Reading and validating transaction files without ever losing a row.

Every row read ends up either in ``accepted`` (canonical names and dtypes from
:mod:`pipeline.schema`) or in ``quarantined`` (its 0-based row number, the first bad field, a
reason naming every problem, and the original values as JSON): rows in = accepted + quarantined.
A file that is unusable as a whole (unreadable, unknown format, a required column missing) raises
:class:`InputError` instead.

Decisions worth knowing:

* Row numbers are 0-based positions among the file's records: the header of a CSV and blank
  lines of a JSON-lines file are not records. A blank line inside a CSV is (polars reads it as
  a row of nulls); it is quarantined as an "empty record".
* ``tx_time`` accepts datetime values and ISO-8601 strings (``T`` or space, optional fractional
  seconds, ``Z``/``UTC`` or a ``±HH:MM`` offset); aware values are converted to UTC, naive ones
  are taken as UTC, and all are stored naive UTC. A bare date means midnight UTC. Epoch numbers
  are quarantined, not guessed: their unit (s/ms/us/ns) and origin cannot be told from the value
  (the handbook's TX_TIME_SECONDS, for one, counts from the start of the simulation).
  Times before 1950 or from 2200 on (placeholders like 1900-01-01, 9999-12-31) are quarantined.
* A ``transaction_id`` seen again is quarantined as a duplicate of its first *valid* occurrence,
  which is kept; a first occurrence quarantined for another reason does not block a later one.
* ``channel`` is optional descriptive data: common spellings are normalised to
  "card-present"/"card-not-present" and anything else becomes null rather than quarantining.
* Integral floats in id and text columns (pandas writes integer ids with nulls as float) become
  integer strings, so 596.0 and 596 are the same customer.
* A CSV that is not valid UTF-8 is decoded as cp1252 (or latin-1) with an :class:`IngestWarning`;
  one in UTF-16/32 with a byte-order mark is decoded (with a warning too), and classic-Mac
  line ends (CR only) are line ends (polars alone would read such a file as one header row).
* An id containing a NUL character is quarantined: no database text column can hold it.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import warnings
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from pipeline import schema
from pipeline.artifacts import atomic_write_bytes
from pipeline.ledger import QuarantinedRow

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

MAX_AMOUNT = 1e12  # beyond any single card payment: a unit or parsing error upstream
# Card payments began in 1950; a time outside these years is a placeholder (0001-01-01,
# 1900-01-01, 9999-12-31) or a unit error upstream, and the ends of polars' range (year 0 after
# an offset, 9999 plus the label delay) cannot be Python datetimes downstream.
MIN_TIME = datetime(1950, 1, 1)
MAX_TIME = datetime(2200, 1, 1)  # exclusive
TIME_RANGE = f"a date-time from {MIN_TIME:%Y-%m-%d} to before {MAX_TIME:%Y-%m-%d}"
ROW_FIELD = "row"  # the quarantine `field` for problems with a whole record (bad JSON, bad CSV)
QUARANTINE_SCHEMA = {
    "row_number": pl.Int64(),
    "field": pl.String(),
    "reason": pl.String(),
    "raw": pl.String(),
}
_ROW = "__row_number"
_FIELD = "__field"
_REASON = "__reason"
_PARSED_TIME = "__parsed_tx_time"  # beside the source values, for tx_time's reason
_SHOWN_CHARS = 60  # how much of a bad value a reason quotes; `raw` keeps all of it

_LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}
_CHANNELS = {
    **dict.fromkeys(
        ("cardpresent", "cp", "pos", "instore", "present", "chip", "swipe"), "card-present"
    ),
    **dict.fromkeys(
        (
            "cardnotpresent",
            "cnp",
            "notpresent",
            "online",
            "ecom",
            "ecommerce",
            "web",
            "internet",
            "moto",
        ),
        "card-not-present",
    ),
}
_ID_FIELDS = (schema.TRANSACTION_ID, schema.CUSTOMER_ID, schema.TERMINAL_ID)
# Fast paths for the common shapes (%#z takes Z, +HH, +HHMM and +HH:MM); the regex takes the rest.
_TIME_FORMATS = (
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
)
_ISO_TIME = (
    r"^(?<date>\d{4}-\d{2}-\d{2})"
    r"(?:[Tt ](?<hm>\d{2}:\d{2})(?<sec>:\d{2})?(?:[.,](?<frac>\d+))?)?"
    r"\s*(?:(?<utc>[Zz]|UTC)|(?<sign>[+-])(?<oh>\d{2}):?(?<om>\d{2})?)?$"
)
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


class InputError(ValueError):
    """The file itself is unusable (cannot be read, unknown format, missing required column).

    The message is for end users: it names the file, the problem, and what was expected/found.
    """


class IngestWarning(UserWarning):
    """Something was read with a fallback the user should know about (e.g. a non-UTF-8 CSV)."""


@dataclass(frozen=True, eq=False)
class IngestResult:
    """Rows that passed validation and rows set aside with the reason, from one source."""

    accepted: pl.DataFrame
    quarantined: pl.DataFrame
    rows_in: int
    source: str

    def __post_init__(self) -> None:
        if self.accepted.height + self.quarantined.height != self.rows_in:
            raise AssertionError(
                f"{self.source}: {self.rows_in} rows in but {self.accepted.height} accepted + "
                f"{self.quarantined.height} quarantined"
            )

    @property
    def counts(self) -> dict[str, int]:
        return {
            "rows_in": self.rows_in,
            "accepted": self.accepted.height,
            "quarantined": self.quarantined.height,
        }

    def quarantine_hashes(self) -> list[str]:
        """What each quarantined row adds to its batch's input hash (``q:ROW:RAW``): a batch
        is keyed by the rows it set aside as well as by those it scored."""
        return [f"q:{r['row_number']}:{r['raw']}"
                for r in self.quarantined.iter_rows(named=True)]

    def ledger_rows(self) -> list[QuarantinedRow]:
        """The quarantined rows as the ledger records them beside the batch's decisions."""
        return [QuarantinedRow(row_number=int(r["row_number"]), field=str(r["field"]),
                               reason=str(r["reason"]), raw=str(r["raw"]))
                for r in self.quarantined.iter_rows(named=True)]


@dataclass(frozen=True)
class _Read:
    """A file's records as a frame, plus what a fallback reader already knows per record."""

    frame: pl.DataFrame
    unreadable: pl.Series | None = None  # String: why a record could not be read, else null
    raw: pl.Series | None = None  # String: JSON of the original record where known exactly


# --- column names -------------------------------------------------------------------------


def canonical_columns(columns: Sequence[str]) -> dict[str, str]:
    """Map source column names to canonical ones via ``schema.ALIASES``, case-insensitively.

    Unknown columns are left out. Two source columns meaning the same canonical column (say
    ``amount`` and ``TX_AMOUNT``) raise :class:`InputError`: which to use would be a guess.
    """
    return _canonical_columns(columns, source=None)


def _canonical_columns(columns: Sequence[str], source: str | None) -> dict[str, str]:
    mapping: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in columns:
        canonical = schema.ALIASES.get(name.strip().lower())
        if canonical is None:
            continue
        if canonical in seen:
            prefix = f"{source}: " if source else ""
            raise InputError(
                f"{prefix}columns '{seen[canonical]}' and '{name}' both map to '{canonical}'; "
                "keep only one of them"
            )
        seen[canonical] = name
        mapping[name] = canonical
    return mapping


def _missing_columns_message(source: str, missing: list[str], found: Sequence[str]) -> str:
    parts = []
    for canonical in missing:
        aliases = [a for a, c in schema.ALIASES.items() if c == canonical and a != canonical]
        also = f" (also accepted, in any case: {', '.join(aliases)})" if aliases else ""
        parts.append(f"'{canonical}'{also}")
    noun = "column" if len(missing) == 1 else "columns"
    shown = ", ".join(found) if found else "(none)"
    return f"{source}: missing required {noun} {'; '.join(parts)}; found columns: {shown}"


# --- validation ---------------------------------------------------------------------------


def validate_transactions(
    frame: pl.DataFrame, *, require_labels: bool = False, source: str = "<frame>"
) -> IngestResult:
    """Check every row of ``frame`` and split it into accepted and quarantined rows.

    Columns are matched to the schema by alias; unknown ones are dropped. With
    ``require_labels`` the ``is_fraud`` column and a label on every row are required.
    """
    return _validate(_Read(frame), require_labels=require_labels, source=source)


def _validate(read: _Read, *, require_labels: bool, source: str) -> IngestResult:
    frame = read.frame
    mapping = _canonical_columns(frame.columns, source)
    required = schema.REQUIRED + ((schema.IS_FRAUD,) if require_labels else ())
    missing = [c for c in required if c not in mapping.values()]
    if missing:
        raise InputError(_missing_columns_message(source, missing, frame.columns))
    dropped = [c for c in frame.columns if c not in mapping]
    if dropped:
        log.info("%s: ignoring columns not in the schema: %s", source, ", ".join(dropped))
    names = {canonical: name for name, canonical in mapping.items()}
    fields = [c for c in schema.DTYPES if c in names]
    for field in fields:
        dtype = frame.schema[names[field]]
        if dtype.is_nested() or dtype in (pl.Binary, pl.Object) or isinstance(dtype, pl.Duration):
            raise InputError(
                f"{source}: column '{names[field]}' holds {dtype} values; expected single "
                f"values convertible to {schema.DTYPES[field]} for '{field}'"
            )

    # The source columns under canonical names; `work` holds the parsed values under the same.
    src = frame.select(pl.col(names[c]).alias(c) for c in fields)
    rules = {c: _rule(c, src.schema[c], require_labels) for c in fields}
    work = src.select(
        *(r.value.cast(schema.DTYPES[c]).alias(c) for c, r in rules.items() if r.value is not None),
        *(r.present.alias(f"__present_{c}") for c, r in rules.items() if r.present is not None),
    ).with_columns(_parse_times(src.get_column(schema.TX_TIME)).alias(schema.TX_TIME))
    src = src.with_columns(work.get_column(schema.TX_TIME).alias(_PARSED_TIME))
    flags = work.select(
        r.bad.fill_null(True).alias(f"__bad_{c}") for c, r in rules.items() if r.bad is not None
    )
    unreadable = read.unreadable
    if unreadable is None:
        unreadable = pl.Series([None] * frame.height, dtype=pl.String)
    # A record with no values at all (a blank line in a CSV reads as one) gets one plain reason.
    empty = pl.when(pl.all_horizontal(pl.all().is_null())).then(pl.lit("empty record: no values"))
    unreadable = frame.select(pl.coalesce(pl.lit(unreadable), empty)).to_series()
    bad = flags.select(pl.any_horizontal(pl.all())).to_series() | unreadable.is_not_null()
    problems = _explain(src, flags, unreadable, rules, bad.arg_true())
    duplicates = _duplicates(work.get_column(schema.TRANSACTION_ID), ~bad)

    keep = ~bad
    keep = keep.scatter(duplicates.get_column(_ROW), False) if duplicates.height else keep
    accepted = work.filter(keep).select(fields)
    problems = pl.concat([problems, duplicates]).sort(_ROW)
    rows = problems.get_column(_ROW)
    raw = _encode_rows(frame.select(pl.all().gather(rows)))
    if read.raw is not None:
        raw = read.raw.gather(rows).fill_null(raw)
    quarantined = pl.DataFrame(
        {
            "row_number": rows,
            "field": problems.get_column(_FIELD),
            "reason": problems.get_column(_REASON),
            "raw": raw,
        },
        schema=QUARANTINE_SCHEMA,
    )
    return IngestResult(accepted, quarantined, frame.height, source)


def _explain(
    src: pl.DataFrame,
    flags: pl.DataFrame,
    unreadable: pl.Series,
    rules: dict[str, _Rule],
    rows: pl.Series,
) -> pl.DataFrame:
    """Row number, first bad field and reason for each bad row; only bad rows are explained."""
    bad = pl.concat(
        [
            src.select(pl.all().gather(rows)),
            flags.select(pl.all().gather(rows)),
            pl.DataFrame(
                {
                    _ROW: rows.cast(pl.Int64),
                    "__unreadable": unreadable.gather(rows),
                }
            ),
        ],
        how="horizontal",
    )
    flagged = [c for c, r in rules.items() if r.bad is not None]
    messages = [pl.when(pl.col(f"__bad_{c}")).then(rules[c].message) for c in flagged]
    fields = [pl.when(pl.col(f"__bad_{c}")).then(pl.lit(c)) for c in flagged]
    # A record that could not be read has no fields to check: its one reason says why.
    unreadable = pl.col("__unreadable")
    return bad.select(
        _ROW,
        pl.when(unreadable.is_not_null())
        .then(pl.lit(ROW_FIELD))
        .otherwise(pl.coalesce(fields))
        .alias(_FIELD),
        pl.when(unreadable.is_not_null())
        .then(unreadable)
        .otherwise(pl.concat_str(messages, separator="; ", ignore_nulls=True))
        .alias(_REASON),
    )


def _duplicates(ids: pl.Series, valid: pl.Series) -> pl.DataFrame:
    """Valid rows whose transaction_id already appeared on an earlier valid row."""
    seen = pl.DataFrame({"id": ids, _ROW: pl.int_range(len(ids), dtype=pl.Int64, eager=True)})
    seen = seen.filter(valid)
    later = seen.filter(~pl.col("id").is_first_distinct())
    first = (
        seen.join(later.select("id").unique(), on="id", how="semi")
        .group_by("id")
        .agg(pl.col(_ROW).min().alias("first"))
    )
    message = pl.concat_str(
        pl.lit("transaction_id: "),
        _shown(pl.col("id")),
        pl.lit(" duplicates row "),
        pl.col("first").cast(pl.String),
        pl.lit(", which is kept"),
    )
    return later.join(first, on="id").select(
        _ROW, pl.lit(schema.TRANSACTION_ID).alias(_FIELD), message.alias(_REASON)
    )


def _as_string(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Values as text; integral floats without the ``.0`` so 596.0 and 596 read the same."""
    if dtype == pl.String:
        return expr
    if dtype.is_float():
        integral = expr.is_finite() & (expr == expr.floor()) & (expr.abs() < 2**53)
        return pl.coalesce(
            pl.when(integral).then(expr.cast(pl.Int64, strict=False).cast(pl.String)),
            expr.cast(pl.String),
        )
    return expr.cast(pl.String)


def _text(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Stripped text with blanks as null: what a value says, for checks and messages."""
    text = _as_string(expr, dtype).str.strip_chars()
    return pl.when(text != "").then(text)


def _shown(text: pl.Expr) -> pl.Expr:
    """A value quoted for a reason, cut short if long."""
    more = pl.when(text.str.len_chars() > _SHOWN_CHARS).then(pl.lit("…")).otherwise(pl.lit(""))
    return pl.concat_str(pl.lit("'"), text.str.slice(0, _SHOWN_CHARS), more, pl.lit("'"))


@dataclass(frozen=True)
class _Rule:
    """How one canonical column is parsed and checked.

    ``value`` parses the source column (None: parsed outside polars expressions). ``bad`` flags
    rows from the parsed value (and ``present``: whether the source held anything); it runs on
    every row so it is cheap. ``message`` explains a flagged row from the source value and runs
    on flagged rows only. All refer to the column by its canonical name.
    """

    value: pl.Expr | None
    present: pl.Expr | None = None
    bad: pl.Expr | None = None
    message: pl.Expr | None = None


def _rule(field: str, dtype: pl.DataType, require_labels: bool) -> _Rule:
    col = pl.col(field)
    text = _text(col, dtype)
    if field in _ID_FIELDS:
        # NUL cannot be stored in PostgreSQL text (nor safely in most tools): not an id.
        message = (
            pl.when(text.str.contains("\x00", literal=True))
            .then(pl.lit(f"{field}: contains a NUL character (expected printable text)"))
            .otherwise(pl.lit(f"{field}: missing value (expected a non-blank id)"))
        )
        bad = col.is_null() | col.str.contains("\x00", literal=True)
        return _Rule(text, bad=bad, message=message)
    if field == schema.TX_TIME:
        epoch = pl.when(text.str.contains(_NUMBER)).then(
            pl.lit(" (epoch numbers are not accepted: their unit and origin are ambiguous)")
        )
        message = (
            pl.when(text.is_null())
            .then(pl.lit("tx_time: missing value (expected an ISO-8601 date-time)"))
            .when(pl.col(_PARSED_TIME).is_not_null())
            .then(
                pl.concat_str(
                    pl.lit(
                        f"tx_time: expected {TIME_RANGE}, got "
                    ),
                    _shown(text),
                )
            )
            .otherwise(
                pl.concat_str(
                    pl.lit(
                        "tx_time: expected an ISO-8601 date-time like 2018-04-01T00:00:31Z, got "
                    ),
                    _shown(text),
                    epoch.fill_null(""),
                )
            )
        )
        in_range = col.is_between(pl.lit(MIN_TIME), pl.lit(MAX_TIME), closed="left")
        return _Rule(None, bad=col.is_null() | ~in_range, message=message)
    if field == schema.AMOUNT:
        number = _amount(col, dtype)
        number = pl.when(number == 0).then(pl.lit(0.0)).otherwise(number)  # -0 is plain 0
        message = (
            pl.when(text.is_null())
            .then(pl.lit("amount: missing value (expected a finite number >= 0)"))
            .when(number.is_finite() & (number > MAX_AMOUNT))
            .then(
                pl.concat_str(
                    pl.lit(
                        f"amount: expected at most {MAX_AMOUNT:,.0f} (larger is a data error), got "
                    ),
                    _shown(text),
                )
            )
            .otherwise(
                pl.concat_str(pl.lit("amount: expected a finite number >= 0, got "), _shown(text))
            )
        )
        bad = col.is_null() | ~col.is_finite() | (col < 0) | (col > MAX_AMOUNT)
        return _Rule(number, bad=bad, message=message)
    if field in (schema.IS_FRAUD, schema.FRAUD_SCENARIO):
        present = pl.col(f"__present_{field}")
        bad = col.is_null() & (present | require_labels if field == schema.IS_FRAUD else present)
        if field == schema.IS_FRAUD:
            value, expected = _label(col, dtype), "0/1 or true/false"
            missing = "is_fraud: missing label (expected 0/1; labels are required here)"
        else:
            value, expected, missing = _scenario(col, dtype), "a whole number 0-127", ""
        message = (
            pl.when(text.is_null())
            .then(pl.lit(missing))
            .otherwise(pl.concat_str(pl.lit(f"{field}: expected {expected}, got "), _shown(text)))
        )
        return _Rule(value, present=text.is_not_null(), bad=bad, message=message)
    if field == schema.CHANNEL:
        key = text.str.to_lowercase().str.replace_all(r"[\s_\-]+", "")
        return _Rule(key.replace_strict(_CHANNELS, default=None, return_dtype=pl.String))
    return _Rule(text)  # free-text descriptive fields


def _amount(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if dtype.is_numeric():
        return col.cast(pl.Float64)
    if dtype in (pl.String, pl.Null) or isinstance(dtype, pl.Categorical | pl.Enum):
        return _text(col, dtype).cast(pl.Float64, strict=False)
    return pl.lit(None, pl.Float64)  # booleans and dates are not amounts


def _label(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if dtype == pl.Boolean:
        return col.cast(pl.Int8)
    if dtype.is_numeric():
        return pl.when(col == 0).then(pl.lit(0, pl.Int8)).when(col == 1).then(pl.lit(1, pl.Int8))
    key = _text(col, dtype).str.to_lowercase()
    return key.replace_strict(_LABELS, default=None, return_dtype=pl.Int8)


def _scenario(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    number = (
        col.cast(pl.Float64)
        if dtype.is_numeric()
        else _text(col, dtype).cast(pl.Float64, strict=False)
    )
    valid = number.is_finite() & (number == number.floor()) & number.is_between(0, 127)
    return pl.when(valid).then(number.cast(pl.Int8, strict=False))


def _parse_times(series: pl.Series) -> pl.Series:
    """Datetimes or ISO-8601 text as naive UTC microseconds; null where unparseable."""
    dtype = series.dtype
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            series = series.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return series.cast(pl.Datetime("us"))
    if dtype == pl.Date:
        return series.cast(pl.Datetime("us"))
    text = pl.select(_text(pl.lit(series), dtype)).to_series()
    # Cheap fixed formats first; only what they leave goes through the general ISO parser.
    out = pl.Series(series.name, [None] * len(text), dtype=pl.Datetime("us"))
    todo = text.is_not_null()
    for fmt in _TIME_FORMATS:
        if not todo.any():
            return out
        idx = todo.arg_true()
        aware = fmt.endswith("z")
        parsed = text.gather(idx).str.strptime(
            pl.Datetime("us", "UTC" if aware else None), fmt, strict=False
        )
        out = out.scatter(idx, parsed.dt.replace_time_zone(None) if aware else parsed)
        todo = todo & out.is_null()
    if todo.any():
        idx = todo.arg_true()
        # In a frame: pl.select(pl.lit(series)) of the null-when-bad result panics in polars.
        rest = pl.DataFrame({"text": text.gather(idx)})
        out = out.scatter(idx, rest.select(_parse_iso(pl.col("text"))).to_series())
    return out


def _parse_iso(text: pl.Expr) -> pl.Expr:
    parts = text.str.extract_groups(_ISO_TIME).struct
    wall = pl.concat_str(
        parts.field("date"),
        pl.lit(" "),
        parts.field("hm").fill_null("00:00"),
        parts.field("sec").fill_null(":00"),
    ).str.strptime(pl.Datetime("us"), "%Y-%m-%d %H:%M:%S", strict=False)
    micros = parts.field("frac").str.slice(0, 6).str.pad_end(6, "0").cast(pl.Int64)
    sign = pl.when(parts.field("sign") == "-").then(-1).otherwise(1)
    hours = parts.field("oh").cast(pl.Int64).fill_null(0)
    minutes = parts.field("om").cast(pl.Int64).fill_null(0)
    # An offset is less than a day, its minutes less than 60 (as the fixed formats and
    # datetime.fromisoformat require): +99:00 is a typo, not a zone, and is not accepted.
    offset = sign * (hours * 60 + minutes)
    time = wall + pl.duration(microseconds=micros.fill_null(0)) - pl.duration(minutes=offset)
    return pl.when((hours < 24) & (minutes < 60)).then(time)


def _encode_rows(frame: pl.DataFrame) -> pl.Series:
    """Each row as a JSON object of its original values; NaN and inf kept as strings."""
    pieces = []
    for name, dtype in frame.schema.items():
        col = pl.col(name)
        if dtype == pl.Object:
            continue
        if dtype == pl.Binary:
            col = col.bin.encode("hex")
        piece = pl.struct(col).struct.json_encode().str.strip_prefix("{").str.strip_suffix("}")
        if dtype.is_float():
            special = col.is_nan() | col.is_infinite()
            key = pl.lit(json.dumps(name) + ':"')
            as_text = pl.concat_str(key, col.cast(pl.String), pl.lit('"'))
            piece = pl.when(special).then(as_text).otherwise(piece)
        pieces.append(piece)
    if frame.height == 0 or not pieces:
        return pl.Series("raw", ["{}"] * frame.height, dtype=pl.String)
    body = pl.concat_str(pieces, separator=",")
    return frame.select(pl.concat_str(pl.lit("{"), body, pl.lit("}")).alias("raw")).to_series()


# --- reading ------------------------------------------------------------------------------


def read_transactions(path: str | Path, *, require_labels: bool = False) -> IngestResult:
    """Read a .parquet, .csv, .jsonl/.ndjson or .json (array) file and validate its rows."""
    path = Path(path)
    source = str(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(
            f"{source}: unsupported file type '{path.suffix or '(no suffix)'}'; expected one of "
            f"{', '.join(sorted(_READERS))}"
        )
    if not path.is_file():
        raise InputError(f"{source}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{source}: file is empty; expected at least a header or a record")
    return _validate(reader(path, source), require_labels=require_labels, source=source)


def _read_parquet(path: Path, source: str) -> _Read:
    try:
        relabelled = utc_relabelled_schema(path)
        if relabelled is None:
            return _Read(pl.read_parquet(path))
        import pyarrow.parquet as pq

        frame = pl.from_arrow(pq.read_table(path, schema=relabelled))
        assert isinstance(frame, pl.DataFrame)
        return _Read(frame)
    # polars raises several types for corrupt files, and panics (not an Exception) on some
    except (Exception, pl.exceptions.PanicException) as error:
        raise InputError(f"{source}: not a readable Parquet file ({error})") from error


def utc_relabelled_schema(path: Path) -> pa.Schema | None:
    """The file's Arrow schema with each top-level timestamp whose zone is no IANA zone name
    (a fixed UTC offset such as "+05:30", or a name polars cannot resolve) relabelled UTC;
    None when there is none. polars panics on such a zone (valid Arrow, written by
    pyarrow/pandas); the stored values are UTC instants whatever the zone says, so reading
    them under this schema changes no value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def unknown(zone: str) -> bool:
        try:
            zoneinfo.ZoneInfo(zone)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            return True
        return False

    stored = pq.read_schema(path)
    odd = {f.name for f in stored if getattr(f.type, "tz", None) and unknown(f.type.tz)}
    if not odd:
        return None
    return pa.schema([pa.field(f.name, pa.timestamp(f.type.unit, "UTC"), f.nullable, f.metadata)
                      if f.name in odd else f for f in stored], metadata=stored.metadata)


def _read_csv(path: Path, source: str) -> _Read:
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    data = _recoded_csv(path, head, source)  # None: the file is read as it is (the fast path)
    if data is not None:
        head = data[: 1 << 16]
    first_line = head.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
    if not first_line.strip():
        raise InputError(f"{source}: no header row; expected column names on the first line")
    if "\x00" in first_line:
        raise InputError(f"{source}: the header holds NUL bytes, as UTF-16/32 text without a "
                         "byte-order mark does; expected UTF-8 (or UTF-16 with its BOM)")
    separator, header = _separator(first_line.rstrip("\r"), source)
    _canonical_columns(header, source)  # polars renames duplicate names, so check them here

    try:
        return _unclosed_quote(_Read(_polars_csv(path if data is None else data, separator)),
                               path if data is None else data)
    except pl.exceptions.PolarsError as error:
        # Not UTF-8, or rows polars cannot take (extra fields): decode, then retry or go slow.
        text = _decode(path.read_bytes() if data is None else data, source)
        if "utf-8" in str(error).lower():
            try:
                utf8 = text.encode("utf-8")
                return _unclosed_quote(_Read(_polars_csv(utf8, separator)), utf8)
            except pl.exceptions.PolarsError:
                pass
        return _unclosed_quote(_python_csv(text, separator, source), text)


def _unclosed_quote(read: _Read, data: Path | bytes | str) -> _Read:
    """The records read, the last marked unreadable where a quote opened in it is never
    closed: CSV readers take the rest of the file into that field, so say so."""
    frame = read.frame
    if frame.height == 0 or (read.unreadable is not None and read.unreadable[-1] is not None):
        return read
    last = frame.row(-1)
    filled = [i for i, value in enumerate(last) if value is not None]
    if not filled:
        return read
    column, value = filled[-1], last[filled[-1]]
    if "\n" not in value and "\r" not in value:
        return read
    quoted = '"' + value.replace('"', '""')
    if isinstance(data, str):
        tail: bytes | str = data[-len(quoted):]
    elif isinstance(data, Path):
        quoted = quoted.encode("utf-8")
        with open(data, "rb") as handle:
            size = handle.seek(0, io.SEEK_END)
            handle.seek(max(0, size - len(quoted)))
            tail = handle.read()
    else:
        quoted = quoted.encode("utf-8")
        tail = data[-len(quoted):]
    if tail != quoted:  # the field's quote is closed: a legitimate multi-line value
        return read
    lines = value.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n").count("\n")
    reason = (f"malformed CSV row: the quote opening field '{frame.columns[column]}' is never "
              f"closed, so the {lines} line{'s' if lines != 1 else ''} after it "
              f"{'were' if lines != 1 else 'was'} read into that field; expected a closing quote")
    unreadable = read.unreadable
    if unreadable is None:
        unreadable = pl.Series([None] * frame.height, dtype=pl.String)
    unreadable = unreadable.scatter(frame.height - 1, reason)
    return _Read(frame, unreadable, read.raw)


def _separator(line: str, source: str) -> tuple[str, list[str]]:
    """The header's separator and names: the candidate splitting it into the most names,
    counting outside quotes only (a quoted name may hold commas, "fee (EUR, net)", in a file
    separated by semicolons); ties go to the comma."""
    best: tuple[str, list[str]] | None = None
    for sep in ",;\t|":
        try:  # strict: a closing quote followed by another separator is not this one
            names = next(csv.reader([line], delimiter=sep, strict=True))
        except csv.Error:
            continue
        if best is None or len(names) > len(best[1]):
            best = (sep, names)
    if best is not None:
        return best
    separator = max(",;\t|", key=line.count)
    try:
        return separator, next(csv.reader([line], delimiter=separator))
    except csv.Error as error:  # e.g. a stray carriage return inside the header
        raise InputError(f"{source}: the header row is not readable CSV ({error}); expected "
                         "column names separated by commas") from error


_UTF_BOMS = (  # UTF-32 first: its little-endian BOM begins with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


def _recoded_csv(path: Path, head: bytes, source: str) -> bytes | None:
    """UTF-8 bytes with LF line ends for the files polars would misread: UTF-16/32 (with a
    byte-order mark) and classic-Mac CR-only line ends (polars would see one long header and
    no rows, silently). None for every other file."""
    encoding = next((enc for bom, enc in _UTF_BOMS if head.startswith(bom)), None)
    cr_only = b"\r" in head and b"\n" not in head
    if encoding is None and not cr_only:
        return None
    data = path.read_bytes()
    if encoding is not None:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as error:
            raise InputError(f"{source}: starts with a {encoding.upper()} byte-order mark but is "
                             f"not valid {encoding.upper()} ({error}); expected UTF-8 text"
                             ) from error
        warnings.warn(f"{source}: {encoding.upper()} text; decoded and read as UTF-8",
                      IngestWarning, stacklevel=4)
        data = text.encode("utf-8")
        cr_only = b"\r" in data and b"\n" not in data
    return data.replace(b"\r", b"\n") if cr_only else data


def _polars_csv(data: Path | bytes, separator: str) -> pl.DataFrame:
    # Every column as String: casting is ours to do, row by row, with a reason when it fails.
    return pl.read_csv(
        data if isinstance(data, Path) else io.BytesIO(data),
        infer_schema=False,
        separator=separator,
        raise_if_empty=True,
    )


def _decode(data: bytes, source: str) -> str:
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        for encoding in ("cp1252", "latin-1"):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                continue
            warnings.warn(
                f"{source}: not valid UTF-8 (byte {data[error.start]:#04x} at offset "
                f"{error.start}); decoded as {encoding}",
                IngestWarning,
                stacklevel=4,
            )
            return text
        raise AssertionError("latin-1 decodes any bytes") from error


def _python_csv(text: str, separator: str, source: str) -> _Read:
    """Slow path for CSV that polars rejects (rows with extra fields): quarantine those rows."""
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter=separator))
    except csv.Error as error:
        raise InputError(f"{source}: not a readable CSV file ({error})") from error
    if not records:
        raise InputError(f"{source}: no header row; expected column names on the first line")
    header, width = records[0], len(records[0])
    columns: list[list[str | None]] = [[] for _ in header]
    unreadable: list[str | None] = []
    raw: list[str | None] = []
    for record in records[1:]:
        if len(record) > width:
            unreadable.append(f"malformed CSV row: {len(record)} fields, header has {width}")
            raw.append(json.dumps(record, ensure_ascii=False))
            record = []
        else:
            unreadable.append(None)
            raw.append(None)
        for i, column in enumerate(columns):
            column.append((record[i] or None) if i < len(record) else None)
    frame = pl.DataFrame(
        {name: values for name, values in zip(_unique(header), columns, strict=True)},
        schema={name: pl.String for name in _unique(header)},
    )
    return _Read(frame, pl.Series(unreadable, dtype=pl.String), pl.Series(raw, dtype=pl.String))


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}_duplicated_{count - 1}")
    return out


_ID_COLUMNS = (schema.TRANSACTION_ID, schema.CUSTOMER_ID, schema.TERMINAL_ID)


def _read_json_lines(path: Path, source: str) -> _Read:
    try:
        frame = pl.read_ndjson(path, infer_schema_length=None)
    except Exception:  # bad lines, mixed nested types: the line-by-line reader sorts them out
        frame = None
    # polars reads a column of integers with one float in it as floats: long numeric ids
    # (16 digits and more) would change. The line-by-line reader keeps each value's own text.
    if frame is not None and not any(
        frame.schema[name].is_nested()
        or (canonical in _ID_COLUMNS and frame.schema[name].is_float())
        for name, canonical in _canonical_columns(frame.columns, source).items()
    ):
        return _Read(frame)
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    return _json_records((line for line in data.split(b"\n") if line.strip()), source)


def _read_json_array(path: Path, source: str) -> _Read:
    data = path.read_bytes()
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise InputError(f"{source}: not valid UTF-8 ({error}); JSON must be UTF-8") from error
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and data.lstrip().startswith(b"{"):
            return _read_json_lines(path, source)  # JSON lines saved as .json
        raise InputError(f"{source}: not valid JSON ({error})") from error
    if not isinstance(document, list):
        raise InputError(
            f"{source}: expected a JSON array of transaction objects, got a JSON "
            f"{type(document).__name__}"
        )
    return _json_records(document, source, parsed=True)


def _json_records(items: Iterable, source: str, parsed: bool = False) -> _Read:
    """One row per JSON line (bytes) or array element; what cannot be a row is quarantined."""
    rows: list[dict[str, str | None]] = []
    unreadable: list[str | None] = []
    raw: list[str] = []
    for item in items:
        if parsed:
            text, record, problem = json.dumps(item, ensure_ascii=False), item, None
        else:
            text, record, problem = _parse_line(item)
        if problem is None and not isinstance(record, dict):
            problem = f"invalid JSON: expected an object, got {_json_kind(record)}"
        raw.append(text)
        unreadable.append(problem)
        rows.append({} if problem else {k: _json_text(v) for k, v in record.items()})
    names = list(dict.fromkeys(key for row in rows for key in row))
    if not rows:
        raise InputError(f"{source}: file is empty; expected JSON objects with transaction fields")
    if not names:
        raise InputError(f"{source}: no record is a JSON object with fields ({unreadable[0]})")
    frame = pl.DataFrame(
        {name: [row.get(name) for row in rows] for name in names},
        schema={name: pl.String for name in names},
    )
    return _Read(frame, pl.Series(unreadable, dtype=pl.String), pl.Series(raw, dtype=pl.String))


def _parse_line(line: bytes) -> tuple[str, object, str | None]:
    """(the line as JSON text, its value, a reason if it is not JSON)."""
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        text = line.decode("latin-1").rstrip("\r\n")
        return json.dumps(text), None, f"invalid JSON: not valid UTF-8 ({error})"
    try:
        return text.strip(), json.loads(text), None
    except json.JSONDecodeError as error:
        return json.dumps(text, ensure_ascii=False), None, f"invalid JSON: {error}"


def _json_kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _json_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))  # as polars does
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # as _as_string does for float columns
    return str(value)


_READERS = {
    ".parquet": _read_parquet,
    ".pq": _read_parquet,
    ".csv": _read_csv,
    ".jsonl": _read_json_lines,
    ".ndjson": _read_json_lines,
    ".json": _read_json_array,
}


# --- writing ------------------------------------------------------------------------------


def write_quarantine(result: IngestResult, path: str | Path) -> Path:
    """Write the quarantined rows to Parquet or CSV (by suffix), atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        result.quarantined.write_parquet(buffer)
    elif suffix == ".csv":
        result.quarantined.write_csv(buffer)
    else:
        raise ValueError(f"{path}: unsupported quarantine file type '{suffix}'; use .parquet/.csv")
    return atomic_write_bytes(path, buffer.getvalue())


def read_quarantine(path: str | Path) -> pl.DataFrame:
    """Read a file written by :func:`write_quarantine` back with its dtypes."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return pl.read_csv(path, schema=QUARANTINE_SCHEMA)
    return pl.read_parquet(path)


__all__ = [
    "InputError",
    "IngestResult",
    "IngestWarning",
    "QUARANTINE_SCHEMA",
    "canonical_columns",
    "read_quarantine",
    "read_transactions",
    "validate_transactions",
    "write_quarantine",
]
