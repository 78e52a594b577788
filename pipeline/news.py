"""Reading and validating news items, the way :mod:`pipeline.ingest` reads transactions: every
row is either accepted or quarantined with its row number, field and reason (rows in = accepted
+ quarantined), and a file that cannot be used at all raises :class:`InputError`.

Columns (any case; aliases in ``ALIASES``): ``news_id``, ``published_at`` (ISO-8601, as for
transactions, or RSS's RFC 2822; from 1950 to before 2200), ``source``, ``headline`` required;
``body`` and ``tickers`` optional. Tickers may be a list, a JSON array text (null entries
skipped), or text separated by commas, semicolons, spaces or ``|``; a leading ``$`` is
dropped and symbols are upper-cased. A row whose tickers are not symbols is quarantined.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import polars as pl

from pipeline.ingest import (
    _READERS,
    MAX_TIME,
    MIN_TIME,
    QUARANTINE_SCHEMA,
    ROW_FIELD,
    TIME_RANGE,
    IngestResult,
    InputError,
    _encode_rows,
    _json_records,
    _parse_times,
    _Read,
    _shown,
    _text,
)
from pipeline.tickers import TICKER_PATTERN

NEWS_ID, PUBLISHED_AT, SOURCE, HEADLINE, BODY, TICKERS = (
    "news_id", "published_at", "source", "headline", "body", "tickers")
REQUIRED = (NEWS_ID, PUBLISHED_AT, SOURCE, HEADLINE)
COLUMNS = (NEWS_ID, PUBLISHED_AT, SOURCE, HEADLINE, BODY, TICKERS)
ALIASES = {
    **dict.fromkeys(("news_id", "id", "article_id", "item_id", "uuid"), NEWS_ID),
    **dict.fromkeys(("published_at", "published", "publish_time", "published_time", "time",
                     "timestamp", "datetime", "date"), PUBLISHED_AT),
    **dict.fromkeys(("source", "publisher", "provider", "site", "outlet"), SOURCE),
    **dict.fromkeys(("headline", "title"), HEADLINE),
    **dict.fromkeys(("body", "text", "content", "summary", "article", "description"), BODY),
    **dict.fromkeys(("tickers", "ticker", "symbols", "symbol"), TICKERS),
}
SCHEMA = {NEWS_ID: pl.String(), PUBLISHED_AT: pl.Datetime("us"), SOURCE: pl.String(),
          HEADLINE: pl.String(), BODY: pl.String(), TICKERS: pl.List(pl.String())}


def read_news(path: str | Path) -> IngestResult:
    """Read a .parquet, .csv, .jsonl/.ndjson or .json file of news items and validate them."""
    path = Path(path)
    source = str(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(f"{source}: unsupported file type '{path.suffix or '(no suffix)'}'; "
                         f"expected one of {', '.join(sorted(_READERS))}")
    if not path.is_file():
        raise InputError(f"{source}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{source}: file is empty; expected at least a header or a record")
    read = reader(path, source)
    if path.suffix.lower() in _JSON_SUFFIXES and read.raw is None and _may_hold_json(read.frame):
        # polars read the lines fast, but an object or array in a text field became a nested
        # column (which would refuse the file) or text (accepted as a headline): read the
        # lines one by one so each such value is its own row's problem, kept as it was.
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
        read = _json_records((line for line in data.split(b"\n") if line.strip()), source)
    return _validate(read, source)


def validate_news(frame: pl.DataFrame, *, source: str = "<frame>") -> IngestResult:
    return _validate(_Read(frame), source)


_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
_TEXT_FIELDS = (NEWS_ID, SOURCE, HEADLINE, BODY)


def _may_hold_json(frame: pl.DataFrame) -> bool:
    """Whether a column read from JSON lines may hold an object or array where text belongs."""
    for name, dtype in frame.schema.items():
        field = ALIASES.get(name.strip().lower())
        if field is None or field == TICKERS:
            continue
        if dtype.is_nested():
            return True
        if dtype == pl.String and frame[name].str.strip_chars_start().str.contains(
                r"^[\[{]").any():
            return True
    return False


def _json_values(raw: str | None, names: dict[str, str]) -> list[tuple[str, str]]:
    """(field, reason) for each text field that the original JSON record gives as an object
    or array."""
    try:
        record = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        return []
    if not isinstance(record, dict):
        return []
    return [(f, f"{f}: expected text, got a JSON "
                f"{'object' if isinstance(record[names[f]], dict) else 'array'}")
            for f in _TEXT_FIELDS
            if f in names and isinstance(record.get(names[f]), dict | list)]


def _mapping(columns: list[str], source: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for name in columns:
        canonical = ALIASES.get(name.strip().lower())
        if canonical is None:
            continue
        if canonical in names:
            raise InputError(f"{source}: columns '{names[canonical]}' and '{name}' both map to "
                             f"'{canonical}'; keep only one of them")
        names[canonical] = name
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        parts = []
        for c in missing:
            aliases = [a for a, v in ALIASES.items() if v == c and a != c]
            parts.append(f"'{c}' (also accepted: {', '.join(aliases)})")
        raise InputError(f"{source}: missing required column{'s' if len(missing) > 1 else ''} "
                         f"{'; '.join(parts)}; found columns: {', '.join(columns) or '(none)'}")
    return names


def _tickers_text(series: pl.Series) -> pl.Series:
    """Tickers as one text per row: lists joined, JSON arrays and separated text as they are."""
    if isinstance(series.dtype, pl.List | pl.Array):
        return series.cast(pl.List(pl.String)).list.join(",")
    return pl.select(_text(pl.lit(series), series.dtype)).to_series()


def _split_tickers(text: str | None) -> tuple[list[str], str | None]:
    """(symbols, None) or ([], reason)."""
    if text is None:
        return [], None
    items: list[str]
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError:
            return [], f"tickers: {stripped[:60]!r} is not a valid JSON array"
        # null entries are skipped, as a list column's are
        if not isinstance(parsed, list) or not all(isinstance(p, str | None) for p in parsed):
            return [], f"tickers: expected a JSON array of strings, got {stripped[:60]!r}"
        items = [p for p in parsed if p is not None]
    else:
        items = re.split(r"[,;|\s]+", stripped)
    out = []
    for item in items:
        symbol = item.strip().lstrip("$").upper()
        if not symbol:
            continue
        if not TICKER_PATTERN.match(symbol):
            return [], (f"tickers: {item[:30]!r} is not a ticker symbol (expected letters, "
                        "digits, '.' or '-', up to 15 characters)")
        out.append(symbol)
    return list(dict.fromkeys(out)), None


def _validate(read: _Read, source: str) -> IngestResult:
    frame = read.frame
    names = _mapping(frame.columns, source)
    for field, name in names.items():
        dtype = frame.schema[name]
        tickers_list = field == TICKERS and isinstance(dtype, pl.List | pl.Array)
        # Durations and bytes do not even cast to text; only tickers may come as lists.
        if (isinstance(dtype, pl.Duration) or dtype in (pl.Binary, pl.Object)
                or (dtype.is_nested() and not tickers_list)):
            raise InputError(f"{source}: column '{name}' holds {dtype} values; expected text for "
                             f"'{field}'")
    n = frame.height
    text = {f: pl.select(_text(pl.lit(frame[names[f]]), frame.schema[names[f]])).to_series()
            if f in names and f not in (PUBLISHED_AT, TICKERS)
            else pl.Series([None] * n, dtype=pl.String) for f in (NEWS_ID, SOURCE, HEADLINE, BODY)}
    published = _parse_times(frame[names[PUBLISHED_AT]])
    published_text = pl.select(_text(pl.lit(frame[names[PUBLISHED_AT]]),
                                     frame.schema[names[PUBLISHED_AT]])).to_series()
    rss = (published.is_null() & published_text.str.contains(r"^[^\d]*\d{1,2} [A-Za-z]{3} ")
           ).arg_true()
    if len(rss):  # RSS feeds' RFC 2822 dates
        published = published.scatter(rss, pl.Series(
            [_rfc2822(t) for t in published_text.gather(rss).to_list()],
            dtype=pl.Datetime("us")))
    # Placeholders (0001-01-01, 1900-01-01) and times past year 9999 in UTC (which Python
    # cannot even hold) are set aside, as transactions' are, before any value is taken out.
    out_of_range = (published.is_not_null()
                    & ~published.is_between(MIN_TIME, MAX_TIME, closed="left")).to_list()
    published = published.set(pl.Series(out_of_range, dtype=pl.Boolean), None)
    tickers_raw = (_tickers_text(frame[names[TICKERS]]) if TICKERS in names
                   else pl.Series([None] * n, dtype=pl.String))
    parsed_tickers = [_split_tickers(t) for t in tickers_raw.to_list()]

    unreadable = read.unreadable.to_list() if read.unreadable is not None else [None] * n
    raw_text = read.raw.to_list() if read.raw is not None else [None] * n
    fields, reasons = [], []
    seen: dict[str, int] = {}
    for i in range(n):
        problems: list[tuple[str, str]] = []
        if unreadable[i] is not None:
            problems.append((ROW_FIELD, unreadable[i]))
        elif all(text[f][i] is None for f in text) and published_text[i] is None:
            problems.append((ROW_FIELD, "empty record: no values"))
        elif nested := (_json_values(raw_text[i], names) if any(
                (text[f][i] or "")[:1] in ("{", "[") for f in _TEXT_FIELDS) else []):
            problems.extend(nested)
        else:
            for field in (NEWS_ID, SOURCE, HEADLINE):
                if text[field][i] is None:
                    problems.append((field, f"{field}: missing value (expected non-blank text)"))
            for field in (NEWS_ID, SOURCE, HEADLINE, BODY):
                if text[field][i] is not None and "\x00" in text[field][i]:
                    problems.append((field, f"{field}: contains a NUL character (expected "
                                     "printable text)"))
            if out_of_range[i]:
                problems.append((PUBLISHED_AT, f"published_at: expected {TIME_RANGE}, got "
                                 f"{_quote(published_text[i] or '')}"))
            elif published[i] is None:
                shown = published_text[i]
                problems.append((PUBLISHED_AT, "published_at: missing value (expected an "
                                 "ISO-8601 date-time)" if shown is None else
                                 "published_at: expected an ISO-8601 date-time like "
                                 f"2024-05-01T13:30:00Z, got {_quote(shown)}"))
            if parsed_tickers[i][1] is not None:
                problems.append((TICKERS, parsed_tickers[i][1]))
            news_id = text[NEWS_ID][i]
            if not problems and news_id is not None:
                if news_id in seen:
                    problems.append((NEWS_ID, f"news_id: {_quote(news_id)} duplicates row "
                                     f"{seen[news_id]}, which is kept"))
                else:
                    seen[news_id] = i
        fields.append(problems[0][0] if problems else None)
        reasons.append("; ".join(r for _, r in problems) if problems else None)

    bad = pl.Series([r is not None for r in reasons], dtype=pl.Boolean)  # typed when empty
    accepted = pl.DataFrame({
        NEWS_ID: text[NEWS_ID], PUBLISHED_AT: published, SOURCE: text[SOURCE],
        HEADLINE: text[HEADLINE], BODY: text[BODY],
        TICKERS: pl.Series([t for t, _ in parsed_tickers], dtype=pl.List(pl.String)),
    }, schema=SCHEMA).filter(~bad)
    rows = bad.arg_true()
    raw = _encode_rows(frame.select(pl.all().gather(rows)))
    if read.raw is not None:
        raw = read.raw.gather(rows).fill_null(raw)
    quarantined = pl.DataFrame({
        "row_number": rows.cast(pl.Int64),
        "field": [fields[i] for i in rows.to_list()],
        "reason": [reasons[i] for i in rows.to_list()],
        "raw": raw,
    }, schema=QUARANTINE_SCHEMA)
    return IngestResult(accepted, quarantined, n, source)


def _rfc2822(text: str) -> datetime | None:
    """An RFC 2822 date-time ("Tue, 24 Nov 2026 10:00:00 GMT") as naive UTC, else None."""
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is not None:  # "-0000" (zone unknown) parses naive: taken as UTC
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _quote(value: str) -> str:
    return pl.select(_shown(pl.lit(value))).item()


__all__ = ["ALIASES", "COLUMNS", "REQUIRED", "read_news", "validate_news"]
