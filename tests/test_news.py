"""News items in: validation and quarantine, ticker extraction, sentence aggregation, the
per-ticker daily table, and classification end to end (library, CLI, Prefect flow) into the
ledger."""

from __future__ import annotations

import html
import json
from datetime import date, datetime

import polars as pl
import pytest

from pipeline.ingest import InputError
from pipeline.ledger import Ledger
from pipeline.news import read_news
from pipeline.news_store import ArticleSentiment, NewsStore
from pipeline.sentiment import Prediction
from pipeline.sentiment.articles import aggregate, split_sentences
from pipeline.tickers import TickerExtractor

GOOD = [
    {"id": "n1", "published": "2024-05-01T13:30:00Z", "source": "wire",
     "headline": "$AAPL beats estimates as iPhone sales jump", "tickers": ["aapl"]},
    {"id": "n2", "published": "2024-05-01T15:00:00+02:00", "source": "wire",
     "headline": "Bitcoin slides 8% as ETF outflows mount",
     "body": "Bitcoin fell to its lowest in two months. Ether dropped too. Analysts at Acme "
             "Inc. expect more volatility."},
    {"id": "n3", "published": "2024-05-02", "source": "blog",
     "headline": "Microsoft schedules annual shareholder meeting", "tickers": "MSFT"},
]
BAD = [
    {"id": "n4", "published": "last tuesday", "source": "wire", "headline": "x"},
    {"id": "n1", "published": "2024-05-03", "source": "wire", "headline": "dup id"},
    {"id": "n5", "published": "2024-05-03", "source": "  ", "headline": "no source"},
    {"id": "n6", "published": "2024-05-03", "source": "s", "headline": "h",
     "tickers": "AAPL, not*a*ticker"},
    {"id": "n7", "published": "2024-05-03", "source": "s", "headline": ""},
]


def _write_jsonl(path, rows, extra_lines=()):
    path.write_text("\n".join([*(json.dumps(r) for r in rows), *extra_lines]) + "\n")
    return path


# --- reading ----------------------------------------------------------------------------------

def test_news_rows_are_accepted_or_quarantined_with_reasons(tmp_path):
    result = read_news(_write_jsonl(tmp_path / "n.jsonl", GOOD + BAD, ["{broken json"]))
    assert result.rows_in == 9 == result.accepted.height + result.quarantined.height
    assert result.accepted["news_id"].to_list() == ["n1", "n2", "n3"]
    assert result.accepted["published_at"].to_list() == [
        datetime(2024, 5, 1, 13, 30), datetime(2024, 5, 1, 13, 0), datetime(2024, 5, 2)]
    assert result.accepted["tickers"].to_list() == [["AAPL"], [], ["MSFT"]]
    q = {r["row_number"]: r for r in result.quarantined.iter_rows(named=True)}
    assert q[3]["field"] == "published_at" and "'last tuesday'" in q[3]["reason"]
    assert q[4]["field"] == "news_id" and "duplicates row 0" in q[4]["reason"]
    assert q[5]["field"] == "source"
    assert q[6]["field"] == "tickers" and "'not*a*ticker'" in q[6]["reason"]
    assert q[7]["field"] == "headline"
    assert q[8]["field"] == "row" and q[8]["reason"].startswith("invalid JSON")
    assert json.loads(q[4]["raw"])["headline"] == "dup id"


def test_csv_and_parquet_read_the_same_items(tmp_path):
    frame = pl.DataFrame([{**r, "tickers": ",".join(r["tickers"]) if isinstance(
        r.get("tickers"), list) else r.get("tickers"), "body": r.get("body")} for r in GOOD])
    frame = frame.rename({"id": "article_id", "published": "published_at", "headline": "Title"})
    frame.write_csv(tmp_path / "n.csv")
    frame.write_parquet(tmp_path / "n.parquet")
    from_csv, from_parquet = read_news(tmp_path / "n.csv"), read_news(tmp_path / "n.parquet")
    assert from_csv.accepted.equals(from_parquet.accepted)
    assert from_csv.accepted["news_id"].to_list() == ["n1", "n2", "n3"]
    assert from_csv.accepted["body"][1].startswith("Bitcoin fell")


def test_a_file_without_headlines_is_refused_naming_the_column(tmp_path):
    (tmp_path / "n.csv").write_text("id,published,source\n1,2024-01-01,wire\n")
    with pytest.raises(InputError, match=r"missing required column 'headline' \(also accepted: "
                                         r"title\); found columns: id, published, source"):
        read_news(tmp_path / "n.csv")


def test_an_object_in_one_items_text_field_quarantines_that_item_not_the_file(tmp_path):
    """A feed item whose body (or source, headline) is a JSON object or array is one bad row:
    quarantined with its field named, the other items read, as a bad row anywhere else is."""
    rows = [
        {"id": "a", "published": "2024-05-01", "source": "wire", "headline": "ok one"},
        {"id": "b", "published": "2024-05-01", "source": "wire", "headline": "bad body",
         "body": {"p": "nested"}},
        {"id": "c", "published": "2024-05-01", "source": {"name": "Reuters"}, "headline": "x"},
        {"id": "d", "published": "2024-05-01", "source": "wire", "headline": ["a", "b"]},
        {"id": "e", "published": "2024-05-01", "source": "wire", "headline": "[Update] ok two"},
    ]
    for only in ([0, 1], [0, 2, 4], [0, 3, 4], [0, 1, 2, 3, 4]):
        path = _write_jsonl(tmp_path / "n.jsonl", [rows[i] for i in only])
        result = read_news(path)
        assert result.rows_in == len(only)
        accepted = result.accepted["news_id"].to_list()
        assert accepted == [rows[i]["id"] for i in only if i in (0, 4)]
        q = {r["row_number"]: r for r in result.quarantined.iter_rows(named=True)}
        for n, i in enumerate(only):
            if i in (1, 2, 3):
                field = {1: "body", 2: "source", 3: "headline"}[i]
                assert q[n]["field"] == field and "JSON" in q[n]["reason"], q[n]
                assert json.loads(q[n]["raw"]) == rows[i]


def test_placeholder_and_out_of_range_times_are_quarantined_not_fatal(tmp_path):
    """9999-12-31 with a western offset is year 10000 in UTC: it crashed the whole read
    (ValueError); 0001-01-01 and 1900-01-01 are placeholders, set aside as for transactions."""
    times = ["9999-12-31T23:59:59-05:00", "0001-01-01", "1900-01-01", "2024-05-01T10:00:00Z"]
    rows = [{"id": str(i), "published": t, "source": "s", "headline": "h"}
            for i, t in enumerate(times)]
    result = read_news(_write_jsonl(tmp_path / "n.jsonl", rows))
    assert result.accepted["news_id"].to_list() == ["3"]
    q = {r["row_number"]: r for r in result.quarantined.iter_rows(named=True)}
    assert sorted(q) == [0, 1, 2]
    for i in (0, 1, 2):
        assert q[i]["field"] == "published_at" and times[i][:10] in q[i]["reason"], q[i]
        assert json.loads(q[i]["raw"]) == rows[i]


def test_rss_dates_are_read_as_utc(tmp_path):
    """RSS feeds give pubDate in RFC 2822 ("Tue, 24 Nov 2026 10:00:00 GMT"): every item of
    such a feed was quarantined."""
    times = ["Tue, 24 Nov 2026 10:00:00 GMT", "Tue, 24 Nov 2026 12:30:00 +0200",
             "24 Nov 2026 10:00 -0000", "Tue, 31 Nov 2026 10:00:00 GMT"]
    rows = [{"id": str(i), "published": t, "source": "s", "headline": "h"}
            for i, t in enumerate(times)]
    result = read_news(_write_jsonl(tmp_path / "n.jsonl", rows))
    assert result.accepted["published_at"].to_list() == [
        datetime(2026, 11, 24, 10, 0), datetime(2026, 11, 24, 10, 30),
        datetime(2026, 11, 24, 10, 0)]
    assert result.quarantined["row_number"].to_list() == [3]


def test_null_entries_in_a_tickers_list_are_skipped_in_every_format(tmp_path):
    """["aapl", null] is AAPL whether the list is a JSON array, JSON text or a Parquet list:
    the same item must not be accepted from one file and quarantined from another."""
    item = {"id": "a", "published": "2024-05-01", "source": "wire", "headline": "h"}
    plain = {**item, "id": "b", "tickers": "MSFT"}  # makes the column text in the JSON file
    lists = _write_jsonl(tmp_path / "l.jsonl", [{**item, "tickers": ["aapl", None]}])
    mixed = _write_jsonl(tmp_path / "m.jsonl", [{**item, "tickers": ["aapl", None]}, plain])
    text = _write_jsonl(tmp_path / "t.jsonl", [{**item, "tickers": '["$aapl", null]'}])
    pl.DataFrame([{**item, "tickers": ["aapl", None]}]).write_parquet(tmp_path / "p.parquet")
    for path in (lists, mixed, text, tmp_path / "p.parquet"):
        result = read_news(path)
        assert result.quarantined.height == 0, (path, result.quarantined.to_dicts())
        assert result.accepted["tickers"][0].to_list() == ["AAPL"], path


# --- tickers and articles ---------------------------------------------------------------------

def test_tickers_from_cashtags_crypto_and_company_names(tmp_path):
    extractor = TickerExtractor()
    text = ("$NVDA and $brk.b gain; Bitcoin tops $100k while ETH and ether ETFs lag. "
            "Apple CEO says IT budgets are up. A Tesla rival, $1.5bn raised")
    assert extractor.extract(text) == ["NVDA", "BRK.B", "BTC", "ETH", "AAPL", "TSLA"]
    assert extractor.extract("The CEO said IT and AI spending rose at A.P. Moller") == []
    companies = tmp_path / "companies.json"
    companies.write_text(json.dumps({"Nokia": "NOKIA.HE", "Acme Corp": "ACME"}))
    custom = TickerExtractor.from_file(companies)
    assert custom.extract("Nokia and ACME CORP sign deal; nokia shares up") == ["NOKIA.HE",
                                                                              "ACME"]
    assert custom.extract_all("$AAPL up", "Nokia too", given=["MSFT"]) == ["MSFT", "AAPL",
                                                                          "NOKIA.HE"]
    companies.write_text(json.dumps({"Bad": "not a ticker"}))
    with pytest.raises(ValueError, match="not a ticker symbol"):
        TickerExtractor.from_file(companies)


def test_a_blank_company_name_is_refused_not_matched_everywhere(tmp_path):
    """A blank name in the company map (a spreadsheet's empty row) would match the empty text
    between any two non-letters (", ") and tag every such article with its ticker."""
    companies = tmp_path / "companies.json"
    for blank in ("", "  "):
        companies.write_text(json.dumps({blank: "XX", "Acme Corp": "ACME"}))
        with pytest.raises(ValueError, match="blank company name"):
            TickerExtractor.from_file(companies)
    assert TickerExtractor().extract("Stocks rose 5% , then fell.  Bonds too.") == []


def test_sentences_split_at_ends_not_at_abbreviations():
    body = ("Acme Inc. said revenue rose 12% to $3.4bn. The U.S. unit grew fastest! "
            "\"We are pleased,\" the CEO said. Shares rose 3.5 % in early trade.")
    assert split_sentences(body) == [
        "Acme Inc. said revenue rose 12% to $3.4bn.", "The U.S. unit grew fastest!",
        "\"We are pleased,\" the CEO said.", "Shares rose 3.5 % in early trade."]
    assert split_sentences("   ") == [] and len(split_sentences("A. " * 100, 40)) <= 40


def test_aggregation_weights_sentences_by_confidence():
    sure_neg = Prediction("negative", {"negative": 0.9, "neutral": 0.05, "positive": 0.05})
    hedged = Prediction("positive", {"negative": 0.3, "neutral": 0.3, "positive": 0.4})
    failed = Prediction(None, {}, failure="no answer")
    label, probs, weights = aggregate([sure_neg, hedged, hedged, failed])
    assert weights == [0.9, 0.4, 0.4]
    assert probs["negative"] == pytest.approx((0.9 * 0.9 + 2 * 0.4 * 0.3) / 1.7, abs=1e-6)
    assert label == "negative"  # an unweighted mean would say negative by less; a vote, positive
    assert aggregate([failed]) == (None, {}, [])


# --- the per-ticker daily table ---------------------------------------------------------------

def test_daily_table_is_upserted_per_ticker_and_day_without_double_counting(db_url):
    def art(news_id, ticker, day, label, score, batch="b1"):
        return ArticleSentiment(news_id, ticker, datetime(2024, 5, day, 9), label, score,
                                "m@1", batch)

    with NewsStore(db_url) as store:
        store.record([art("a", "AAPL", 1, "positive", 0.8), art("b", "AAPL", 1, "negative", -0.6),
                      art("b", "MSFT", 1, "negative", -0.6), art("c", "AAPL", 2, "neutral", 0.1)])
        store.record([art("a", "AAPL", 1, "positive", 0.8)])  # the same article again
        rows = {(r["ticker"], r["day"]): r for r in store.daily()}
        assert rows[("AAPL", date(2024, 5, 1))]["articles"] == 2
        assert rows[("AAPL", date(2024, 5, 1))]["mean_score"] == pytest.approx(0.1)
        assert (rows[("AAPL", date(2024, 5, 1))]["positive"],
                rows[("AAPL", date(2024, 5, 1))]["negative"]) == (1, 1)
        # Re-classified by a newer model: the article's row is replaced, the day recomputed.
        store.record([art("b", "AAPL", 1, "neutral", 0.0, batch="b2")])
        day = store.daily("AAPL", start=date(2024, 5, 1), end=date(2024, 5, 1))
        assert [(d["articles"], d["negative"], d["neutral"]) for d in day] == [(2, 0, 1)]
        assert day[0]["mean_score"] == pytest.approx(0.4)
        assert len(store.daily()) == 3


def test_an_article_whose_time_moves_to_another_day_is_counted_on_that_day_only(db_url):
    """The same news id re-sent with a corrected publication time (another UTC day): its
    (news_id, ticker) row moves, so the old day must lose it, not keep counting it."""
    def art(day, hour, label, score, news_id="a"):
        return ArticleSentiment(news_id, "AAPL", datetime(2024, 5, day, hour), label, score,
                                "m@1", "b1")

    with NewsStore(db_url) as store:
        store.record([art(1, 23, "positive", 0.8), art(1, 9, "negative", -0.4, news_id="b")])
        store.record([art(2, 1, "positive", 0.8)])  # "a" corrected: now on May 2
        rows = {r["day"]: (r["articles"], r["positive"], r["negative"], r["mean_score"])
                for r in store.daily("AAPL")}
        assert rows == {date(2024, 5, 1): (1, 0, 1, pytest.approx(-0.4)),
                        date(2024, 5, 2): (1, 1, 0, pytest.approx(0.8))}
        store.record([art(2, 9, "negative", -0.4, news_id="b")])  # May 1 now has no article
        assert [(r["day"], r["articles"]) for r in store.daily("AAPL")] == [
            (date(2024, 5, 2), 2)]
        assert sum(r["articles"] for r in store.daily()) == len(store.articles()) == 2


def test_a_backfill_touching_many_ticker_days_is_written_whole(db_url):
    """A history backfill that touches tens of thousands of (ticker, day) pairs in one batch
    (more than a PostgreSQL statement takes as parameters in one IN list)."""
    from datetime import timedelta

    articles = [ArticleSentiment(f"n{t}-{d}", f"T{t}", datetime(2024, 1, 1, 12) + timedelta(d),
                                 ("positive", "negative", "neutral")[(t + d) % 3], 0.25, "m@1",
                                 "backfill") for t in range(700) for d in range(50)]
    with NewsStore(db_url) as store:
        assert store.record(articles) == 35_000
        daily = store.daily()
    assert len(daily) == 35_000 and {r["articles"] for r in daily} == {1}
    assert sum(r["positive"] for r in daily) == sum(1 for a in articles if a.label == "positive")


# --- end to end -------------------------------------------------------------------------------

@pytest.fixture
def news_file(tmp_path):
    return _write_jsonl(tmp_path / "news.jsonl", GOOD + BAD[:2])


def test_concurrent_writers_keep_the_daily_counts_whole(db_url):
    """Two writers classifying articles of the same ticker and day at once: each recomputes the
    day from the article rows, so they must not interleave (writers are serialised)."""
    import threading

    labels = ("positive", "negative", "neutral")
    with NewsStore(db_url):
        pass  # tables created before the writers start
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            with NewsStore(db_url) as store:
                for b in range(15):
                    store.record([ArticleSentiment(
                        f"{name}-{b}-{i}", "AAPL", datetime(2026, 11, 20, 9, b, i),
                        labels[(b + i) % 3], 0.1, "m@1", f"{name}-{b}") for i in range(4)])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with NewsStore(db_url) as store:
        (day,) = store.daily("AAPL")
        assert len(store.articles("AAPL")) == 120
    assert day["articles"] == 120
    assert day["positive"] + day["negative"] + day["neutral"] == 120
    assert day["positive"] == 40


def _check_batch(db_url, report, model_dir):
    manifest = json.loads((model_dir / "manifest.json").read_text())
    with Ledger(db_url) as ledger:
        assert ledger.verify().ok
        decisions = {d["subject_id"]: d for d in ledger.decisions(kind="sentiment")}
        quarantined = ledger.quarantined(report.batch_id)
    assert sorted(decisions) == ["n1", "n2", "n3"] and len(quarantined) == 2
    n2 = decisions["n2"]
    e = n2["explanation"]
    assert n2["model_version"] == manifest["model_id"]
    assert n2["index_version"].endswith(":training-examples")
    assert e["weights_sha256"] == manifest["weights_sha256"]
    assert n2["decision"] in ("negative", "neutral", "positive")
    assert n2["score"] == pytest.approx(e["probabilities"][n2["decision"]])
    assert e["tickers"] == ["BTC", "ETH"]
    assert e["units"] == 4 and e["aggregation"]["units"] == 4  # headline + 3 sentences
    assert e["attributions"]["method"] == "occlusion" and e["attributions"]["words"]
    assert len(e["nearest_training_examples"]) == 3
    assert len(n2["input_hash"]) == 64
    with NewsStore(db_url) as store:
        tickers = {(r["ticker"], r["day"]) for r in store.daily()}
    assert tickers == {("AAPL", date(2024, 5, 1)), ("BTC", date(2024, 5, 1)),
                       ("ETH", date(2024, 5, 1)), ("MSFT", date(2024, 5, 2))}


def test_classify_file_records_every_decision_and_rerun_adds_nothing(
        sentiment_model, news_file, db_url, tmp_path):
    from pipeline.sentiment.backends import EncoderClassifier
    from pipeline.sentiment.jobs import classify_file

    classifier = EncoderClassifier.load(sentiment_model["directory"])
    with Ledger(db_url) as ledger, NewsStore(db_url) as store:
        report = classify_file(news_file, classifier, tmp_path / "out.parquet", ledger=ledger,
                               store=store)
        again = classify_file(news_file, classifier, tmp_path / "out.parquet", ledger=ledger,
                              store=store)
    assert (report.rows_in, report.rows_classified, report.rows_quarantined) == (5, 3, 2)
    assert report.ledger_added == 3 and again.ledger_added == 0
    assert again.batch_id == report.batch_id and again.ledger_already_present == 3
    out = pl.read_parquet(report.output)
    assert out["news_id"].to_list() == ["n1", "n2", "n3"]
    assert ((out["p_negative"] + out["p_neutral"] + out["p_positive"] - 1).abs() < 1e-5).all()
    assert out["score"].to_list() == pytest.approx(
        (out["p_positive"] - out["p_negative"]).to_list())
    _check_batch(db_url, report, sentiment_model["directory"])


def test_classification_in_chunks_reports_progress_and_labels_as_one_call(
        sentiment_model, news_file, monkeypatch):
    from pipeline.sentiment import jobs
    from pipeline.sentiment.backends import EncoderClassifier

    classifier = EncoderClassifier.load(sentiment_model["directory"])
    ingested = read_news(news_file)
    whole = jobs.classify_news(ingested, classifier)
    monkeypatch.setattr(jobs, "DEFAULT_CHUNK_ARTICLES", 2)
    told = []
    chunked = jobs.classify_news(ingested, classifier, progress=lambda *a: told.append(a))
    assert told == [(2, 3), (3, 3)]
    assert chunked.results["label"].to_list() == whole.results["label"].to_list()
    for label in ("p_negative", "p_neutral", "p_positive"):
        assert chunked.results[label].to_list() == pytest.approx(whole.results[label].to_list(),
                                                               abs=1e-5)
    assert chunked.results["units"].to_list() == whole.results["units"].to_list() == [1, 4, 1]


def test_classify_command(sentiment_model, news_file, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    db = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    result = CliRunner().invoke(app, [
        "sentiment", "classify", "--input", str(news_file), "--model", sentiment_model["name"],
        "--root", str(sentiment_model["root"]), "--output", str(tmp_path / "out.csv"),
        "--db", db, "--backend", "encoder"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert "ledger +3" in flat and "4 ticker-days updated" in flat
    out = pl.read_csv(tmp_path / "out.csv")
    assert out["tickers"].to_list() == ["AAPL", "BTC,ETH", "MSFT"]
    assert (tmp_path / "out.quarantine.parquet").exists()


def test_classify_command_prints_bracketed_names_as_they_are(sentiment_model, news_file,
                                                              tmp_path):
    """A file named feed[reuters].jsonl gives batch feed[reuters]-…: the printed batch id and
    paths are the real ones (not read as console markup), and brackets never crash it."""
    import shutil

    from typer.testing import CliRunner

    from pipeline.cli import app

    source = shutil.copy(news_file, tmp_path / "feed[reuters].jsonl")
    db = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    base = ["sentiment", "classify", "--input", str(source), "--model", sentiment_model["name"],
            "--root", str(sentiment_model["root"]), "--db", db]
    result = CliRunner().invoke(app, [*base, "--output", str(tmp_path / "res[bold].csv")],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    with Ledger(db) as ledger:
        (batch,) = {d["batch_id"] for d in ledger.decisions(kind="sentiment")}
    assert batch.startswith("feed[reuters]-")
    assert f"batch {batch} " in result.output
    assert f"results in {tmp_path / 'res[bold].csv'}" in result.output
    again = CliRunner().invoke(app, [*base, "--output", str(tmp_path / "o.csv"), "--batch-id",
                                     "[/bold]"], env={"COLUMNS": "400"})
    assert again.exit_code == 0, again.output
    assert "batch [/bold] " in again.output


class _FixedClassifier:
    """A stand-in backend: every text neutral (what is tested here is the batch, not a model)."""

    backend = "encoder"
    model_id = "fixed@0"

    def classify(self, texts, *, explain=True):
        return [Prediction("neutral", {"negative": 0.1, "neutral": 0.8, "positive": 0.1})
                for _ in texts]

    def audit_fields(self):
        return {"backend": self.backend, "model_id": self.model_id, "index_version": "-"}


def test_files_of_one_name_with_nothing_classifiable_get_their_own_batches(db_url, tmp_path):
    """A feed file dropped under the same name each time, once with every row bad and once
    with other bad rows: each is its own batch (named by its quarantined rows), not a
    conflicting re-run of the first; re-running either adds nothing."""
    from pipeline.sentiment.jobs import classify_file

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _write_jsonl(tmp_path / "a" / "feed.jsonl", [BAD[0]])
    second = _write_jsonl(tmp_path / "b" / "feed.jsonl",
                          [BAD[0] | {"published": "next friday"}, BAD[2]])
    with Ledger(db_url) as ledger, NewsStore(db_url) as store:
        reports = [classify_file(path, _FixedClassifier(), tmp_path / f"out{i}.parquet",
                                 ledger=ledger, store=store)
                   for i, path in enumerate((first, second, first, second))]
        assert reports[0].batch_id != reports[1].batch_id
        assert [r.batch_id for r in reports[2:]] == [r.batch_id for r in reports[:2]]
        assert [r.rows_quarantined for r in reports] == [1, 2, 1, 2]
        assert len(ledger.quarantined()) == 3 and ledger.verify().ok


def test_classify_news_flow(sentiment_model, news_file, prefect_harness, tmp_path):
    from flows.classify_news import classify_news

    db = f"sqlite:///{tmp_path / 'flow.sqlite'}"
    report = classify_news(input=str(news_file), model=sentiment_model["name"],
                           output=str(tmp_path / "flow.parquet"), db=db,
                           root=str(sentiment_model["root"]))
    assert report.rows_classified == 3 and report.ledger_added == 3 and report.daily_rows == 4
    _check_batch(db, report, sentiment_model["directory"])


def test_classify_news_flow_refuses_a_password_in_a_plain_db_parameter(news_file, prefect_harness,
                                                                        tmp_path):
    """Prefect shows plain flow parameters in its UI and API; a password must come as a
    SecretStr (masked) or from the environment."""
    from flows.classify_news import classify_news

    with pytest.raises(ValueError, match="SecretStr") as refused:
        classify_news(input=str(news_file), model="unused", output=str(tmp_path / "x.parquet"),
                      db="postgresql://analyst:pw-canary@127.0.0.1:1/test")
    assert "pw-canary" not in str(refused.value)
    assert not (tmp_path / "x.parquet").exists()


def test_html_case_report_explains_a_news_classification(sentiment_model, tmp_path,
                                                          monkeypatch):
    """An auditor's case report of a sentiment decision shows the article, the label's
    probabilities and why: the words that moved it, the nearest labelled training texts and the
    body's sentences; every text escaped."""
    from pipeline import audit
    from pipeline.sentiment.backends import EncoderClassifier
    from pipeline.sentiment.jobs import classify_file

    monkeypatch.setenv("FINSENTINEL_PSEUDONYM_KEY", "k" * 32)
    hostile = {"id": "n9", "published": "2024-05-03T08:00:00Z", "source": "<b>wire</b>",
               "headline": 'Shares of <script>alert("x")</script> Corp plunge after fraud probe'}
    path = _write_jsonl(tmp_path / "news.jsonl", [*GOOD, hostile])
    classifier = EncoderClassifier.load(sentiment_model["directory"])
    with Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}") as ledger, \
            NewsStore(f"sqlite:///{tmp_path / 'l.sqlite'}") as store:
        classify_file(path, classifier, tmp_path / "out.parquet", ledger=ledger, store=store)
        decisions = {d["subject_id"]: d for d in ledger.decisions(kind="sentiment")}
        report = audit.export(ledger, tmp_path / "case.html", "html",
                              decision_ids=[decisions["n2"]["decision_id"],
                                            decisions["n9"]["decision_id"]])
    page = (tmp_path / "case.html").read_text()
    assert report.rows == 2 and page.count('<section class="case"') == 2
    assert "<script" not in page and "<b>wire" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page

    n2 = decisions["n2"]
    case = page[page.index(f'id="d{n2["seq"]}"'):]
    case = case[:case.index("</section>")]
    e = n2["explanation"]
    assert "Bitcoin slides 8% as ETF outflows mount" in case
    assert "Bitcoin fell to its lowest in two months." in case  # the body
    assert "BTC, ETH" in case and f"{n2['score']:.4f}" in case
    for label, p in e["probabilities"].items():
        assert f"<td>{label}</td><td class='n'>{p:,.4f}".rstrip("0").rstrip(".") in case
    for word in e["attributions"]["words"]:
        assert f"<td>{word['word']}</td>" in case
    for example in e["nearest_training_examples"]:
        assert f"<td>{html.escape(example['text'])}</td><td>{example['label']}</td>" in case
    for sentence in e["aggregation"]["sentences"]:
        assert f"<td>{html.escape(sentence['text'])}</td>" in case
    assert e["weights_sha256"] in case and n2["hash"] in case


def test_an_article_reclassified_with_fewer_tickers_leaves_the_tickers_it_lost(db_url):
    """An article classified again with another company map (or a corrected text) that no longer
    names a ticker: that ticker's day must stop counting it; a run that did not classify the
    article (not in ``classified``) leaves its rows alone."""
    def art(news_id, ticker, label="positive", score=0.5):
        return ArticleSentiment(news_id, ticker, datetime(2024, 5, 1, 9), label, score, "m@1",
                                "b1")

    with NewsStore(db_url) as store:
        store.record([art("a", "AAPL"), art("a", "MSFT"), art("b", "MSFT", "negative", -0.5)],
                     classified=["a", "b"])
        store.record([art("c", "NVDA")], classified=["c"])  # "a" untouched by this run
        assert {r["ticker"]: r["articles"] for r in store.daily()} == {
            "AAPL": 1, "MSFT": 2, "NVDA": 1}
        store.record([art("a", "AAPL", "neutral", 0.0)], classified=["a"])  # MSFT no longer
        days = {r["ticker"]: (r["articles"], r["positive"], r["negative"], r["neutral"])
                for r in store.daily()}
        assert days == {"AAPL": (1, 0, 0, 1), "MSFT": (1, 0, 1, 0), "NVDA": (1, 1, 0, 0)}
        store.record([], classified=["a", "b"])  # both now name no ticker at all
        assert {r["ticker"]: r["articles"] for r in store.daily()} == {"NVDA": 1}
        assert sorted((r["news_id"], r["ticker"]) for r in store.articles()) == [("c", "NVDA")]


# --- the store's SQLite file that cannot be used ------------------------------------------------

def _an_article(batch="b1"):
    return ArticleSentiment("a", "AAPL", datetime(2024, 5, 1, 9), "positive", 0.5, "m@1", batch)


def test_news_store_in_a_read_only_folder_names_the_file(tmp_path, read_only):
    from pipeline.ledger import LedgerError

    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(folder)
    path = folder / "ledger.sqlite"
    with pytest.raises(LedgerError) as caught:
        NewsStore(f"sqlite:///{path}")
    message = str(caught.value)
    assert str(path) in message and f"folder {folder} is not writable" in message, message
    assert not path.exists()


def test_news_store_at_a_folder_names_it(tmp_path):
    from pipeline.ledger import LedgerError

    path = tmp_path / "ledger.sqlite"
    path.mkdir()
    with pytest.raises(LedgerError) as caught:
        NewsStore(f"sqlite:///{path}")
    message = str(caught.value)
    assert str(path) in message and "it is a folder, not a database file" in message, message


def test_news_store_in_a_read_only_file_names_it_when_writing(tmp_path, read_only):
    from pipeline.ledger import LedgerError

    path = tmp_path / "ledger.sqlite"
    with NewsStore(f"sqlite:///{path}") as store:
        store.record([_an_article()])
    read_only(path)
    with NewsStore(f"sqlite:///{path}") as store:
        assert len(store.daily()) == 1  # a read-only copy still reads
        with pytest.raises(LedgerError) as caught:
            store.record([_an_article("b2")])
        message = str(caught.value)
        assert str(path) in message and "the file is read-only" in message, message


def test_news_store_in_a_folder_made_read_only_names_it(tmp_path, read_only):
    from pipeline.ledger import LedgerError

    path = tmp_path / "ro" / "ledger.sqlite"
    with NewsStore(f"sqlite:///{path}") as store:
        store.record([_an_article()])
    read_only(path.parent)
    with pytest.raises(LedgerError) as caught, NewsStore(f"sqlite:///{path}") as store:
        store.record([_an_article("b2")])
    message = str(caught.value)
    assert str(path) in message and f"folder {path.parent} is not writable" in message, message


def test_news_store_at_a_file_that_is_not_sqlite_names_it(tmp_path):
    from pipeline.ledger import LedgerError

    path = tmp_path / "notes.txt"
    path.write_bytes(b"id,amount\n1,2\n" * 40)
    with pytest.raises(LedgerError) as caught:
        NewsStore(f"sqlite:///{path}")
    assert str(path) in str(caught.value) and "not a SQLite database" in str(caught.value)
    assert path.read_bytes() == b"id,amount\n1,2\n" * 40


# --- re-runs of older batches -----------------------------------------------------------------

class _LabelClassifier(_FixedClassifier):
    """Every text gets ``label`` (a stand-in model with a chosen answer)."""

    def __init__(self, label="neutral", model_id="fixed@0"):
        self.label, self.model_id = label, model_id

    def classify(self, texts, *, explain=True):
        probs = {"negative": 0.1, "neutral": 0.1, "positive": 0.1} | {self.label: 0.8}
        return [Prediction(self.label, dict(probs)) for _ in texts]


def test_rerun_of_an_older_batch_keeps_a_later_batch_that_left_the_ticker(db_url, tmp_path):
    """Batch "old" put the article under AAPL; batch "new" (later) classified it again with a
    company map that no longer names Apple, so AAPL lost it. Re-running "old" must not put it
    back: the table holds each article's latest classification, which names no ticker."""
    from pipeline.sentiment.jobs import classify_file

    path = _write_jsonl(tmp_path / "n.jsonl", [
        {"id": "x", "published": "2024-05-01T09:00:00Z", "source": "wire",
         "headline": "Apple opens a store"}])
    no_apple = TickerExtractor(companies={})
    with Ledger(db_url) as ledger, NewsStore(db_url) as store:
        def run(batch, extractor=None):
            return classify_file(path, _LabelClassifier("positive"), tmp_path / "o.parquet",
                                 ledger=ledger, store=store, batch_id=batch,
                                 extractor=extractor)

        run("old")
        assert [(r["ticker"], r["articles"]) for r in store.daily()] == [("AAPL", 1)]
        run("new", no_apple)
        assert store.daily() == [] and store.articles() == []
        again = run("old")
        assert again.ledger_already_present == 1
        assert store.daily() == [] and store.articles() == []


def test_a_slower_writer_of_an_older_batch_does_not_overwrite_a_later_one(db_url, tmp_path):
    """Two runs at once (the CLI and the scheduled flow): batch "old" is recorded in the ledger
    first, batch "new" after it, but "old" reaches the daily table last. The table must keep
    the article's latest classification ("new"'s), not whichever writer came last."""
    from pipeline.sentiment.jobs import classify_file

    path = _write_jsonl(tmp_path / "n.jsonl", [
        {"id": "x", "published": "2024-05-01T09:00:00Z", "source": "wire",
         "headline": "Apple opens a store"}])

    class Delayed:
        """A store whose writes are held back, to be replayed later."""

        def __init__(self, store):
            self.store, self.calls = store, []

        def record(self, *args, **kwargs):
            self.calls.append((args, kwargs))
            return 0

    with Ledger(db_url) as ledger, NewsStore(db_url) as store:
        slow = Delayed(store)
        classify_file(path, _LabelClassifier("positive"), tmp_path / "a.parquet",
                      ledger=ledger, store=slow, batch_id="old")
        classify_file(path, _LabelClassifier("negative"), tmp_path / "b.parquet",
                      ledger=ledger, store=store, batch_id="new")
        (args, kwargs), = slow.calls
        store.record(*args, **kwargs)  # "old" arrives last
        (day,) = store.daily("AAPL")
        assert (day["articles"], day["positive"], day["negative"]) == (1, 0, 1)
        assert [a["batch_id"] for a in store.articles()] == ["new"]


def test_the_same_news_file_twice_counts_each_article_once(db_url, tmp_path):
    from pipeline.sentiment.jobs import classify_file

    path = _write_jsonl(tmp_path / "n.jsonl", GOOD + BAD)
    with Ledger(db_url) as ledger, NewsStore(db_url) as store:
        first, again = (classify_file(path, _LabelClassifier("positive"), tmp_path / "o.parquet",
                                      ledger=ledger, store=store) for _ in range(2))
        assert again.batch_id == first.batch_id and again.ledger_added == 0
        for report in (first, again):
            assert (report.rows_in, report.rows_classified, report.rows_quarantined) == (8, 3, 5)
        days = {(r["ticker"], r["day"]): (r["articles"], r["positive"]) for r in store.daily()}
        assert days == {("AAPL", date(2024, 5, 1)): (1, 1), ("BTC", date(2024, 5, 1)): (1, 1),
                        ("ETH", date(2024, 5, 1)): (1, 1), ("MSFT", date(2024, 5, 2)): (1, 1)}
        assert len(ledger.decisions(kind="sentiment")) == 3
        assert len(ledger.quarantined(first.batch_id)) == 5


def test_crypto_names_that_are_common_words_need_a_capital(tmp_path):
    """"a ripple through markets", "an avalanche of selling" are not XRP or AVAX news: they
    would put the article's sentiment on those tickers' days. The names (capitalised) are."""
    extractor = TickerExtractor()
    assert extractor.extract("Rate hike sends a ripple through bonds; an avalanche of selling "
                             "follows as banks tether rates to the Fed") == []
    assert extractor.extract("Ripple wins its case; Avalanche and TETHER rally") == [
        "XRP", "AVAX", "USDT"]
    assert extractor.extract("bitcoin and ethereum rise") == ["BTC", "ETH"]  # as before
    companies = tmp_path / "companies.json"
    companies.write_text(json.dumps({"ripple": "RPL"}))  # a deployment's own name: any case
    assert TickerExtractor.from_file(companies).extract("ripple shares up") == ["RPL"]


def test_a_crypto_symbol_alias_is_one_ticker_however_it_is_written():
    """XBT is bitcoin: as a bare symbol it counts under BTC, so as a cashtag or a given ticker
    it must too, or one asset's articles split over two tickers' days."""
    extractor = TickerExtractor()
    assert extractor.extract("$XBT futures rise with bitcoin") == ["BTC"]
    assert extractor.extract_all("XBT up", given=["XBT"]) == ["BTC"]
    assert extractor.extract_all("$AAPL up", given=["MSFT"]) == ["MSFT", "AAPL"]
