"""The analysts' dashboard: PSI, sign-in, the paged queries on SQLite and PostgreSQL, and every
page through Streamlit's AppTest against a ledger seeded by the real pipeline."""

from __future__ import annotations

import math
import os
import time
import uuid
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from dashboard_seed import PASSWORD, USER, seed
from sqlalchemy.engine import make_url

from pipeline.dashboard.auth import AuthConfigError, Users, hash_password
from pipeline.dashboard.queries import AlertFilter, DashboardQueries, SearchFilter
from pipeline.drift import psi
from pipeline.ledger import READ_INDEXES, Ledger

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"  # as tests/conftest.py
APP = str(Path(__file__).resolve().parents[1] / "pipeline" / "dashboard" / "app.py")
PAGES = ("Alerts", "Case", "Sentiment", "Models and data", "Audit")


# --- PSI -------------------------------------------------------------------------------------

def test_psi_has_the_textbook_value():
    # Two bins cut at 0.5; shares 50/50 -> 25/75:
    # (0.25 - 0.5) ln(0.25/0.5) + (0.75 - 0.5) ln(0.75/0.5) = 0.25 (ln 2 + ln 1.5)
    expected = np.array([0.1] * 50 + [0.9] * 50)
    actual = np.array([0.1] * 25 + [0.9] * 75)
    result = psi(expected, actual, edges=np.array([0.5]))
    assert result.value == pytest.approx(0.25 * (math.log(2) + math.log(1.5)))
    assert result.expected_share == [0.5, 0.5] and result.actual_share == [0.25, 0.75]
    assert result.level == "significant shift"


def test_psi_is_near_zero_for_the_same_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    reference = rng.beta(2, 8, 20_000)
    same = psi(reference, rng.beta(2, 8, 20_000))
    shifted = psi(reference, rng.beta(3, 7, 20_000))
    assert same.value < 0.01 and same.level == "stable"
    assert shifted.value > 0.1
    assert len(same.edges) == 11 and sum(same.expected_share) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="actual holds NaN"):
        psi(reference, np.array([0.1, np.nan]))


# --- sign-in ---------------------------------------------------------------------------------

def test_passwords_are_salted_scrypt_hashes_checked_in_constant_time():
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first != second and PASSWORD not in first and first.startswith("scrypt$16384$8$1$")
    users = Users.parse(f"{USER}:{first}, bob:{hash_password('another password')}")
    assert users.authenticate(USER, PASSWORD) == USER
    assert users.authenticate(" alice ", PASSWORD) == USER
    assert users.authenticate(USER, PASSWORD + "x") is None
    assert users.authenticate("mallory", PASSWORD) is None
    assert users.authenticate("bob", PASSWORD) is None
    with pytest.raises(ValueError, match="at least 8 characters"):
        hash_password("short")


@pytest.mark.parametrize(("text", "message"), [
    (None, "no dashboard users"),
    ("   ", "no dashboard users"),
    ("alice", r"entry 1 \(.alice.\): expected name:hash"),
    ("alice:plaintext-password", r"entry 1 \('alice'\): expected scrypt\$N"),
    ("alice:scrypt$16384$8$1$!!$abc", r"entry 1 \('alice'\): malformed"),
    ("alice:scrypt$1000$8$1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5", "N a power of two"),
])
def test_bad_user_configuration_is_refused_naming_the_entry(text, message):
    with pytest.raises(AuthConfigError, match=message):
        Users.parse(text)
    if text and "plaintext-password" in text:
        with pytest.raises(AuthConfigError) as info:
            Users.parse(text)
        assert "plaintext-password" not in str(info.value)


def test_a_user_listed_twice_is_refused():
    encoded = hash_password(PASSWORD)
    with pytest.raises(AuthConfigError, match="entry 2 \\('alice'\\): user 'alice' is listed"):
        Users.parse(f"alice:{encoded} alice:{encoded}")


@pytest.mark.parametrize("params", [
    "1073741824$8$1",  # 128 GiB per check: every sign-in failed with a ValueError
    "65536$1$1",  # N >= 2**(16 r): OpenSSL refuses it at every sign-in
    "16384$8$1024",  # valid, but each check (each guess) held a core for ~50 s
    "16384$1048576$1",  # 2 TiB
    "2$1$4194304",  # p so large that scrypt's first buffer alone is 512 MiB
])
def test_scrypt_parameters_no_sign_in_could_use_are_refused_at_start(params):
    """A hash that parsed but could never be checked (or only at an absurd cost) used to
    disable its user silently, each sign-in a traceback, or tie up a core per attempt."""
    entry = f"alice:scrypt${params}$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5"
    with pytest.raises(AuthConfigError, match=r"entry 1 \('alice'\): scrypt parameters out"):
        Users.parse(entry)
    long_key = "a" * 200  # 150 bytes: the derivation's length is the key's
    with pytest.raises(AuthConfigError, match="key 16-64 bytes"):
        Users.parse(f"alice:scrypt$16384$8$1$c2FsdHNhbHQ${long_key}")
    # Other sane costs than the default still parse and check.
    for n, r, p in ((2**10, 1, 1), (2**15, 8, 1), (2**12, 4, 4)):
        users = Users.parse(f"alice:{hash_password(PASSWORD, n=n, r=r, p=p)}")
        assert users.authenticate("alice", PASSWORD) == "alice"
        assert users.authenticate("alice", "wrong password!") is None


def test_an_unknown_name_costs_the_same_scrypt_work_as_a_known_one(monkeypatch):
    """An unknown name was checked against the default cost whatever the users' hashes were
    made with: a user whose hash has other parameters answered in another time than a name
    that does not exist. Now an unknown name costs what a configured hash costs (one chosen by
    the name, the same each time)."""
    import hashlib

    seen: list[tuple[int, int, int, int]] = []
    real = hashlib.scrypt

    def scrypt(password, **kw):
        seen.append((kw["n"], kw["r"], kw["p"], kw["dklen"]))
        return real(password, **kw)

    alice = hash_password(PASSWORD, n=2**12, r=8, p=2)
    users = Users.parse(f"alice:{alice}")
    monkeypatch.setattr(hashlib, "scrypt", scrypt)
    assert users.authenticate("alice", "wrong password!") is None
    assert users.authenticate("mallory", "wrong password!") is None
    assert seen == [(2**12, 8, 2, 32)] * 2
    # Several parameter sets: each unknown name gets one of them, always the same one.
    bob = hash_password(PASSWORD, n=2**11, r=8, p=1)
    users = Users.parse(f"alice:{alice} bob:{bob}")
    chosen = {}
    for i in range(24):
        seen.clear()
        users.authenticate(f"nobody{i}", "x")
        users.authenticate(f"nobody{i}", "y")
        assert len(seen) == 2 and seen[0] == seen[1]
        chosen[i] = seen[0]
    assert set(chosen.values()) == {(2**12, 8, 2, 32), (2**11, 8, 1, 32)}


# --- the seeded ledger -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return {}


def _seeded(seeds, backend, tmp_path_factory, request):
    if backend not in seeds:
        work = tmp_path_factory.mktemp(f"dash-{backend}")
        if backend == "sqlite":
            url = f"sqlite:///{work / 'ledger.sqlite'}"
        else:
            admin = request.getfixturevalue("pg_admin")
            schema_name = f"fs_dash_{uuid.uuid4().hex[:10]}"
            with admin.begin() as conn:
                conn.execute(sa.schema.CreateSchema(schema_name))
            request.addfinalizer(lambda: _drop(admin, schema_name))
            url = make_url(os.environ.get("FINSENTINEL_TEST_PG_URL", PG_DEFAULT)) \
                .update_query_dict({"options": f"-csearch_path={schema_name}"}) \
                .render_as_string(hide_password=False)
        seeds[backend] = seed(url, work / "work")
    return seeds[backend]


def _drop(admin, schema_name):
    with admin.begin() as conn:
        conn.execute(sa.schema.DropSchema(schema_name, cascade=True))


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql",
                                                               marks=pytest.mark.postgres)])
def seeded(request, seeds, tmp_path_factory):
    return _seeded(seeds, request.param, tmp_path_factory, request)


@pytest.fixture(scope="module")
def seeded_sqlite(request, seeds, tmp_path_factory):
    return _seeded(seeds, "sqlite", tmp_path_factory, request)


def _fraud(seeded) -> list[dict]:
    with Ledger(seeded["db"]) as ledger:
        return ledger.decisions(kind="fraud")


def _on_latest_day(decisions: list[dict]) -> list[dict]:
    """The decisions about the last day's transactions: the Alerts page's default queue."""
    day = max(d["inputs"]["transaction"]["tx_time"][:10] for d in decisions)
    return [d for d in decisions if d["inputs"]["transaction"]["tx_time"][:10] == day]


def _expected_queue(decisions, budget=100, keep=lambda tx: True):
    best: dict[str, dict] = {}
    for d in sorted(decisions, key=lambda d: (-d["score"], d["seq"])):
        tx = d["inputs"]["transaction"]
        if keep(tx):
            best.setdefault(tx["customer_id"], d)
    return [(card, d["score"]) for card, d in list(best.items())[:budget]]


def _queue(queries, flt):
    first = queries.alerts(flt)
    rows = list(first.rows)
    for page in range(1, first.pages):
        rows += queries.alerts(flt, page=page).rows
    return first, rows


# --- queries (SQLite and PostgreSQL) ---------------------------------------------------------

def test_alert_days_are_the_transactions_days_not_the_scoring_day(seeded):
    """The seeded batch is a week of 2018 scored today: its alerts fall on their own days."""
    decisions = _fraud(seeded)
    queries = DashboardQueries(Ledger(seeded["db"]))
    days = sorted({d["inputs"]["transaction"]["tx_time"][:10] for d in decisions}, reverse=True)
    assert len(days) == 7 and days[0] < "2019"
    assert [d.isoformat() for d in queries.fraud_days()] == days
    assert [d.isoformat() for d in queries.fraud_days(limit=2)] == days[:2]
    assert all(d["subject_time"][:10] == d["inputs"]["transaction"]["tx_time"][:10]
               for d in decisions)
    earliest = date.fromisoformat(days[-1])
    first, rows = _queue(queries, AlertFilter(day=earliest, budget=1000))
    on_day = [d for d in decisions if d["inputs"]["transaction"]["tx_time"][:10] == days[-1]]
    assert first.day == earliest
    assert [(r["card"], r["score"]) for r in rows] == _expected_queue(on_day, 1000)


def test_alert_queue_is_the_days_top_cards_by_their_highest_score(seeded):
    decisions = _on_latest_day(_fraud(seeded))
    queries = DashboardQueries(Ledger(seeded["db"]))
    first, rows = _queue(queries, AlertFilter())
    assert first.cards == 100 and first.pages == 4 and len(rows) == 100
    assert rows[0]["score"] == max(d["score"] for d in decisions)
    assert [(r["card"], r["score"]) for r in rows] == _expected_queue(decisions)
    assert [r["rank"] for r in rows] == list(range(1, 101))
    assert len({r["card"] for r in rows}) == 100
    top = rows[0]
    assert "nearest neighbours fraud" in top["reasons"] and top["status"] == "open"
    assert top["merchant"] and top["channel"] in ("card-present", "card-not-present")


def test_alert_filters_by_channel_merchant_and_score(seeded):
    decisions = _on_latest_day(_fraud(seeded))
    queries = DashboardQueries(Ledger(seeded["db"]))
    _, rows = _queue(queries, AlertFilter(channel="card-not-present", budget=30))
    assert [(r["card"], r["score"]) for r in rows] == _expected_queue(
        decisions, 30, lambda tx: tx["channel"] == "card-not-present")
    merchant = rows[0]["merchant"]
    word = merchant.split()[0].lower()
    _, rows = _queue(queries, AlertFilter(merchant=word.upper()))
    assert rows and [(r["card"], r["score"]) for r in rows] == _expected_queue(
        decisions, 100, lambda tx: word in (tx.get("merchant_name") or "").lower())
    _, rows = _queue(queries, AlertFilter(min_score=0.2))
    assert rows and min(r["score"] for r in rows) >= 0.2
    assert len(rows) == len(_expected_queue([d for d in decisions if d["score"] >= 0.2]))
    assert queries.alerts(AlertFilter(merchant="%")).rows == []  # LIKE wildcards are escaped
    with pytest.raises(ValueError, match="min score"):
        AlertFilter(min_score=1.5)


def test_review_status_and_audit_search_pages(seeded):
    ledger = Ledger(seeded["db"])
    queries = DashboardQueries(ledger)
    top = queries.alerts(AlertFilter()).rows[0]
    ledger.record_feedback(top["decision_id"], "false-positive", "known customer", "carol")
    ledger.record_feedback(top["decision_id"], "confirmed-fraud", "called the card holder",
                           "dave")
    again = queries.alerts(AlertFilter()).rows[0]
    assert (again["status"], again["reviewer"]) == ("confirmed-fraud", "dave")
    case = queries.case(top["decision_id"])
    assert [r["reviewer"] for r in case["reviews"]] == ["carol", "dave"]
    assert queries.case("no-such-decision") is None

    total = ledger.count()
    page1 = queries.search(SearchFilter())
    assert [r["seq"] for r in page1.rows] == list(range(total, total - 50, -1))
    page2 = queries.search(SearchFilter(), before=page1.before)
    assert [r["seq"] for r in page2.rows] == list(range(total - 50, total - 100, -1))
    back = queries.search(SearchFilter(), after=page2.after)
    assert [r["seq"] for r in back.rows] == [r["seq"] for r in page1.rows]
    one = queries.search(SearchFilter(subject_id=top["transaction"], kind="fraud"))
    assert [(r["decision_id"], r["review"]) for r in one.rows] == [(top["decision_id"],
                                                                    "confirmed-fraud")]
    assert one.before is None and one.after is None
    assert queries.count(SearchFilter(kind="fraud")) == seeded["scored"]
    alerts = [d for d in _fraud(seeded) if d["decision"] == "alert"]
    assert queries.count(SearchFilter(kind="fraud", decision="alert")) == len(alerts)


def test_sentiment_and_batch_queries(seeded):
    from pipeline.news_store import NewsStore

    queries = DashboardQueries(Ledger(seeded["db"]))
    assert [(t["ticker"], t["articles"]) for t in queries.tickers()] == [("AAPL", 7),
                                                                         ("MSFT", 6)]
    with NewsStore(seeded["db"]) as store:
        expected = store.daily("AAPL")
    daily = queries.sentiment_daily("AAPL")
    assert [(d["day"], d["mean_score"]) for d in daily] == [(d["day"], d["mean_score"])
                                                            for d in expected]
    first = daily[0]["day"]
    headlines = queries.headlines("AAPL", first)
    assert [h["headline"] for h in headlines] == ["$AAPL beats estimates, shares jump",
                                                  "$AAPL holds annual meeting"]
    assert [h["label"] for h in headlines] == ["positive", "neutral"]
    words = headlines[0]["explanation"]["attributions"]["words"]
    assert [w["word"] for w in words] == ["beats", "jump"]

    batch = queries.latest_batch()
    assert batch["batch_id"] == seeded["batch_id"]
    scores = queries.batch_scores(batch["batch_id"])
    assert len(scores["scores"]) == seeded["scored"]
    assert scores["index_version"] == seeded["index_version"]
    assert scores["settings"]["k"] == 20 and scores["knn_scores"] == scores["scores"]


def test_an_older_ledger_gets_the_read_indexes_on_open(seeded):
    url = seeded["db"]
    with Ledger(url) as ledger, ledger.read() as conn:
        names = {i["name"] for i in sa.inspect(conn).get_indexes("decisions")}
    assert {i.name for i in READ_INDEXES} <= names
    engine = sa.create_engine(Ledger(url).url)
    with engine.begin() as conn:
        for index in READ_INDEXES:
            conn.execute(sa.text(f"DROP INDEX {index.name}"))
    with Ledger(url) as ledger:
        with ledger.read() as conn:
            names = {i["name"] for i in sa.inspect(conn).get_indexes("decisions")}
        meta = ledger.meta()
    engine.dispose()
    assert {i.name for i in READ_INDEXES} <= names
    assert all(f"index_{i.name}" in meta for i in READ_INDEXES)
    assert meta["schema_version"] == "3"


def test_training_reference_scores_come_from_the_index(seeded_sqlite):
    from pipeline.artifacts import ArtifactError
    from pipeline.drift import index_reference_scores

    ref = index_reference_scores(seeded_sqlite["indexes"], seeded_sqlite["index_version"],
                                 k=20, smoothing=1.0, sample=500)
    again = index_reference_scores(seeded_sqlite["indexes"], seeded_sqlite["index_version"],
                                   k=20, smoothing=1.0, sample=500)
    assert ref.shape == (500,) and np.array_equal(ref, again)
    assert ((ref >= 0) & (ref <= 1)).all() and ref.std() > 0
    with pytest.raises(ArtifactError, match="does not name a saved index"):
        index_reference_scores(seeded_sqlite["indexes"], "dash@unsaved", k=20, smoothing=1.0)


def test_failed_sign_ins_lock_a_name_for_the_window_whatever_the_session():
    from pipeline.dashboard.auth import SignInThrottle

    now = [1000.0]
    throttle = SignInThrottle(max_failures=3, window_s=600, clock=lambda: now[0])
    for _ in range(2):
        throttle.failed(" alice ")
        now[0] += 10
    assert throttle.retry_after("alice") == 0  # two failures: still allowed
    throttle.failed("alice")  # the third, at t = 1020
    assert throttle.retry_after("alice") == pytest.approx(1000 + 600 - 1020)
    assert throttle.retry_after("bob") == 0  # per name
    now[0] = 1600.5  # the first failure has left the window: one more try
    assert throttle.retry_after("alice") == 0
    throttle.failed("alice")
    assert throttle.retry_after("alice") == pytest.approx(1010 + 600 - 1600.5)
    throttle.succeeded("alice")  # a good password clears the name
    assert throttle.retry_after("alice") == 0
    # Sprayed names do not grow memory past max_names.
    small = SignInThrottle(max_failures=3, window_s=600, clock=lambda: now[0], max_names=10)
    for i in range(50):
        small.failed(f"user{i}")
    assert len(small._failures) == 10


# --- the pages through AppTest ---------------------------------------------------------------

@pytest.fixture(autouse=True)
def _fresh_sign_in_throttle():
    """Failed sign-ins count per server process: each test starts with none."""
    from pipeline.dashboard.pages import _throttle

    _throttle.clear()
    yield
    _throttle.clear()

@pytest.fixture
def app_env(seeded_sqlite, monkeypatch, tmp_path):
    users = f"{USER}:{hash_password(PASSWORD)}"
    monkeypatch.setenv("FINSENTINEL_DB", seeded_sqlite["db"])
    monkeypatch.setenv("FINSENTINEL_INDEXES", str(seeded_sqlite["indexes"]))
    monkeypatch.setenv("FINSENTINEL_MODELS", str(tmp_path / "no-models"))
    monkeypatch.setenv("FINSENTINEL_EVALUATIONS", str(seeded_sqlite["evaluations"]))
    monkeypatch.setenv("FINSENTINEL_DASHBOARD_USERS", users)
    monkeypatch.setenv("FINSENTINEL_PSEUDONYM_KEY", "a-test-key-of-sufficient-length")
    return seeded_sqlite


def _app(**query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in query.items():
        at.query_params[key] = value
    return at


def _sign_in(at, user=USER, password=PASSWORD):
    at.run()
    at.text_input(key="login_user").input(user)
    at.text_input(key="login_password").input(password)
    at.button[0].click().run()
    assert not at.exception, at.exception
    return at


def _table(at, *columns):
    """The first table on the page with these columns (AppTest does not expose table keys)."""
    for frame in at.dataframe:
        if set(columns) <= set(frame.value.columns):
            return frame.value
    raise AssertionError(f"no table with columns {columns}")


def _shows_no_data(at):
    assert len(at.dataframe) == 0 and len(at.metric) == 0
    assert not at.get("vega_lite_chart") and not at.sidebar.radio
    assert [t.label for t in at.text_input] == ["User", "Password"]


@pytest.mark.parametrize("page", PAGES)
def test_no_ledger_data_before_sign_in_on_any_page(app_env, page):
    decision = _fraud(app_env)[0]["decision_id"]
    at = _app(page=page, decision=decision)
    at.run()
    assert not at.exception
    _shows_no_data(at)
    _sign_in(at, password="wrong password!")
    assert [e.value for e in at.error] == ["Unknown user or wrong password."]
    _shows_no_data(at)
    assert "user" not in at.session_state


def test_repeated_wrong_passwords_lock_the_name_across_sessions(app_env):
    """Five wrong passwords for a name, each from a new browser session: the sixth attempt is
    refused without a check, even with the right password, and shows no data."""
    for _ in range(5):
        at = _sign_in(_app(), password="wrong password!")
        assert [e.value for e in at.error] == ["Unknown user or wrong password."]
    at = _sign_in(_app())  # the right password, too late
    assert "user" not in at.session_state
    assert at.error[0].value.startswith("Too many failed sign-ins for this user: try again in")
    _shows_no_data(at)
    at = _sign_in(_app(), user="bob", password="wrong password!")  # other names are not locked
    assert [e.value for e in at.error] == ["Unknown user or wrong password."]


def test_without_users_the_dashboard_does_not_open(app_env, monkeypatch):
    monkeypatch.delenv("FINSENTINEL_DASHBOARD_USERS")
    at = _app()
    at.run()
    assert "no dashboard users" in at.error[0].value
    assert len(at.text_input) == 0 and len(at.dataframe) == 0


def test_alerts_page_lists_the_highest_score_first(app_env):
    at = _sign_in(_app())
    assert at.sidebar.radio(key="page").value == "Alerts"
    assert at.sidebar.markdown[0].value == f"Signed in as **{USER}**"
    table = at.dataframe[0].value
    assert table["score"].iloc[0] == max(d["score"] for d in _on_latest_day(_fraud(app_env)))
    assert len(table) == 25 and list(table["rank"]) == list(range(1, 26))
    at.selectbox(key="alert_channel").select("card-present").run()
    table = at.dataframe[0].value
    assert set(table["channel"]) == {"card-present"}
    at.number_input(key="alert_page").set_value(4).run()
    assert list(at.dataframe[0].value["rank"]) == list(range(76, 101))


def test_case_page_shows_the_decision_and_records_review_by_the_signed_in_analyst(app_env):
    at = _sign_in(_app())
    top = at.dataframe[0].value.iloc[0]
    at.button(key="open_case").click().run()
    assert at.sidebar.radio(key="page").value == "Case"
    case = next(d for d in _fraud(app_env) if d["subject_id"] == top["transaction"])
    assert at.text_input(key="case_id").value == case["decision_id"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Score"] == f"{case['score']:.4f}"
    assert metrics["Threshold"] == f"{case['threshold']:.4f}"
    neighbours = _table(at, "transaction_id", "similarity", "label")
    assert list(neighbours["transaction_id"]) == [
        n["transaction_id"] for n in case["explanation"]["neighbours"]]
    facts = dict(_table(at, "field", "value").values)
    assert facts["index version"] == app_env["index_version"]
    assert facts["model version"] == case["model_version"] == "numeric-only"
    assert len(at.get("vega_lite_chart")) == 3  # score, neighbourhood, features
    assert "principal components" in " ".join(c.value for c in at.caption)

    with Ledger(app_env["db"]) as ledger:
        before = len(ledger.feedback(decision_id=case["decision_id"]))
    at.text_area(key="review_comment").input("card holder confirmed by phone")
    at.button(key="review_false-positive").click().run()
    assert not at.exception
    assert at.success[0].value.endswith(f"false-positive by {USER}.")
    with Ledger(app_env["db"]) as ledger:
        reviews = ledger.feedback(decision_id=case["decision_id"])
        assert ledger.verify().ok
    assert len(reviews) == before + 1
    assert (reviews[-1]["reviewer"], reviews[-1]["label"], reviews[-1]["comment"]) == (
        USER, "false-positive", "card holder confirmed by phone")
    assert _table(at, "seq", "label", "reviewer", "comment")["reviewer"].iloc[-1] == USER


def test_sentiment_page_shows_the_series_and_the_headlines_behind_a_point(app_env):
    at = _sign_in(_app(page="Sentiment"))
    assert at.selectbox(key="sent_ticker").value == "AAPL"
    assert len(at.get("vega_lite_chart")) == 1
    days = at.selectbox(key="sent_day").options
    at.selectbox(key="sent_day").select_index(len(days) - 1).run()  # the first day
    table = _table(at, "headline", "label")
    assert list(table["headline"]) == ["$AAPL beats estimates, shares jump",
                                       "$AAPL holds annual meeting"]
    assert list(table["label"]) == ["positive", "neutral"]
    assert "over 2 articles (1 positive, 0 negative, 1 neutral)" in at.caption[0].value


def test_models_page_shows_manifests_drift_and_evaluations(app_env):
    import json

    from pipeline.dashboard.queries import DashboardQueries
    from pipeline.drift import index_reference_scores

    at = _sign_in(_app(page="Models and data"))
    assert not at.exception
    manifests = _table(at, "name", "vector_count")
    name, version = app_env["index_version"].split("@")
    manifest = json.loads((app_env["indexes"] / name / version / "manifest.json").read_text())
    assert list(manifests["name"]) == ["dash"] and manifests["version"].iloc[0] == version
    assert manifests["vector_count"].iloc[0] == manifest["vector_count"]
    scores = DashboardQueries(Ledger(app_env["db"])).batch_scores(app_env["batch_id"])
    reference = index_reference_scores(app_env["indexes"], app_env["index_version"], k=20,
                                       smoothing=1.0)
    expected = psi(reference, np.array(scores["knn_scores"]))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["PSI"] == f"{expected.value:.3f}" and metrics["Shift"] == expected.level
    assert metrics["Batch rows"] == f"{app_env['scored']:,}"
    report = json.loads((app_env["evaluations"] / "logreg.json").read_text())
    evaluations = _table(at, "file", "scorer")
    assert evaluations["scorer"].iloc[0] == report["scorer"]
    assert evaluations["auc_roc mean"].iloc[0] == report["summary"]["auc_roc"]["mean"]


def test_audit_page_searches_verifies_and_exports(app_env):
    import io

    import polars as pl

    at = _sign_in(_app(page="Audit"))
    with Ledger(app_env["db"]) as ledger:
        head = ledger.count()
    results = _table(at, "seq", "created_at", "decision_id")
    assert results["seq"].iloc[0] == head and len(results) == 50
    at.button(key="audit_older").click().run()
    assert _table(at, "seq", "created_at", "decision_id")["seq"].iloc[0] == head - 50
    at.button(key="verify").click().run()
    assert at.success[0].value.startswith("Chain intact")
    assert f"chain of {head} records verified" in at.success[0].value

    at.text_input(key="audit_batch").input(app_env["batch_id"])
    at.text_input(key="audit_outcome").input("alert").run()
    shown = _table(at, "seq", "created_at", "decision_id")
    assert set(shown["decision"]) == {"alert"}
    at.button(key="export").click().run()
    assert not at.exception and not at.error
    ready = at.session_state["export_ready"]
    exported = pl.read_csv(io.BytesIO(ready["data"]))
    alerts = [d for d in _fraud(app_env) if d["decision"] == "alert"]
    assert exported.height == ready["rows"] == len(alerts)
    # Pseudonymised by default: no raw card id appears in the export.
    cards = {d["inputs"]["transaction"]["customer_id"] for d in alerts}
    assert not cards & set(exported["customer_id"].cast(pl.String).to_list())


def test_review_counts_by_label_come_from_the_ledger(app_env):
    """The Alerts status column after reviews equals the latest review of each decision."""
    with Ledger(app_env["db"]) as ledger:
        latest = defaultdict(str)
        for review in ledger.feedback():
            latest[review["decision_id"]] = review["label"]
    at = _sign_in(_app())
    queries = DashboardQueries(Ledger(app_env["db"]))
    rows = queries.alerts(AlertFilter()).rows
    table = at.dataframe[0].value
    assert list(table["status"]) == [latest.get(r["decision_id"]) or "open" for r in rows]


# --- untrusted text is shown as text ---------------------------------------------------------

LURE = "[Session expired: sign in again](https://evil.example/login)"
PIXEL = "![](https://tracker.example/p.png)"
TOKEN = "[verify](https://evil.example/v)"


def _shown_as_text(markdown: str, text: str) -> None:
    """``markdown`` (an element body or label, which Streamlit renders as Markdown with math)
    shows exactly ``text``: no link, no image, no formatting, no $...$ math."""
    import html
    import re

    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").render(markdown)
    assert "<a " not in rendered and "<img" not in rendered and "<em>" not in rendered
    assert re.search(r"(?<!\\)\$", markdown) is None, markdown  # no math delimiter left
    assert html.unescape(re.sub(r"<[^>]+>", "", rendered)).strip() == text


@pytest.fixture
def hostile_env(app_env, tmp_path, monkeypatch):
    """A ledger whose feed-supplied text is Markdown: a transaction id and a headline."""
    import json

    import polars as pl
    from dashboard_seed import LexiconClassifier

    from pipeline import jobs
    from pipeline.index import FraudIndex
    from pipeline.news_store import NewsStore
    from pipeline.sentiment.jobs import classify_file

    db = f"sqlite:///{tmp_path / 'hostile.sqlite'}"
    batch = app_env["batch"].head(30).drop("is_fraud", "fraud_scenario", strict=False)
    batch = batch.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(LURE))
                               .otherwise(pl.col("transaction_id").cast(pl.String))
                               .alias("transaction_id"))
    batch.write_parquet(tmp_path / "hostile.parquet")
    news = tmp_path / "hostile.jsonl"
    news.write_text(json.dumps({
        "id": "h1", "published": "2024-05-01T10:00:00", "source": "wire", "tickers": ["AAPL"],
        "headline": f"$AAPL beats, $MSFT jump {LURE} {PIXEL} *now* x`{TOKEN}`y"}) + "\n")

    class WordsFromText(LexiconClassifier):  # occlusion explains with the article's own words
        def classify(self, texts, *, explain: bool = True):
            out = super().classify(texts, explain=explain)
            for text, pred in zip(texts, out, strict=True):
                pred.explanation["attributions"]["words"] = [
                    {"word": w, "weight": 0.5} for w in text.split() if "`" in w]
            return out

    index = FraudIndex.load(app_env["index_version"].split("@")[0], app_env["indexes"])
    with Ledger(db) as ledger:
        jobs.score_file(tmp_path / "hostile.parquet", index, tmp_path / "s.parquet",
                        ledger=ledger)
        with NewsStore(ledger.url) as store:
            classify_file(news, WordsFromText(), tmp_path / "n.parquet", ledger=ledger,
                          store=store)
        lured = next(d for d in ledger.decisions(kind="fraud") if d["subject_id"] == LURE)
    monkeypatch.setenv("FINSENTINEL_DB", db)
    return {"decision_id": lured["decision_id"], "decision": lured["decision"]}


def test_feed_text_and_url_parameters_are_shown_as_text_not_markdown(hostile_env):
    # A decision id in a shared link (?decision=...) that is no decision: echoed as text.
    at = _sign_in(_app(page="Case", decision=LURE))
    [error] = at.error
    _shown_as_text(error.value, f"No decision {LURE!r} in the ledger.")
    # A transaction id from the feed, in the case's heading.
    at = _sign_in(_app(page="Case", decision=hostile_env["decision_id"]))
    assert not at.exception
    _shown_as_text(at.subheader[0].value,
                   f"fraud decision on {LURE}: {hostile_env['decision'].upper()}")
    # A news headline, in the label of the expander that explains it.
    at = _sign_in(_app(page="Sentiment"))
    assert not at.exception
    [expander] = at.expander
    _shown_as_text(expander.label,
                   f"positive: $AAPL beats, $MSFT jump {LURE} {PIXEL} *now* x`{TOKEN}`y")
    [words] = [m.value for m in at.markdown if m.value.startswith("Words that moved")]
    _shown_as_text(words, f"Words that moved the label (occlusion): x`{TOKEN}`y")


def test_models_page_reads_the_weekly_evaluations_under_the_workdir(app_env, monkeypatch,
                                                                    tmp_path):
    """With only $FINSENTINEL_WORKDIR set (docs/operations.md), the weekly evaluation writes
    to $FINSENTINEL_WORKDIR/evaluations: the dashboard reads its reports from there too."""
    import json
    import shutil

    from pipeline.settings import JobSettings

    monkeypatch.delenv("FINSENTINEL_EVALUATIONS")
    monkeypatch.setenv("FINSENTINEL_WORKDIR", str(tmp_path / "srv"))
    written = JobSettings.from_env().evaluations  # where flows/evaluate.py writes
    written.mkdir(parents=True)
    shutil.copy(app_env["evaluations"] / "logreg.json", written / "knn-2018-04-22.json")
    report = json.loads((written / "knn-2018-04-22.json").read_text())
    at = _sign_in(_app(page="Models and data"))
    assert not at.exception
    evaluations = _table(at, "file", "scorer")
    assert list(evaluations["file"]) == ["knn-2018-04-22.json"]
    assert evaluations["auc_roc mean"].iloc[0] == report["summary"]["auc_roc"]["mean"]


# --- review safety, news cases, missing ledgers, exports -------------------------------------

def _unescaped(markdown: str) -> str:
    """Markdown text with the backslash escapes of :func:`plain` removed."""
    import re

    return re.sub(r"\\(.)", r"\1", markdown)


def _copy_ledger(seeded, tmp_path, name="copy.sqlite"):
    """A private copy of the seeded SQLite ledger (tests that write or tamper use it)."""
    import sqlite3

    source = make_url(seeded["db"]).database
    target = tmp_path / name
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return f"sqlite:///{target}"


@pytest.fixture
def news_env(app_env, tmp_path, monkeypatch):
    """A ledger with news decisions only: one labelled, one an LLM's failure."""
    import json

    from dashboard_seed import LexiconClassifier

    from pipeline.news_store import NewsStore
    from pipeline.sentiment import Prediction
    from pipeline.sentiment.jobs import classify_file

    class FailsOnProbe(LexiconClassifier):
        def classify(self, texts, *, explain: bool = True):
            out = super().classify(texts, explain=explain)
            return [Prediction(None, {}, {"attempts": 3, "rationale": None},
                               failure="answer outside the schema after 3 attempts")
                    if "probe" in text else pred for text, pred in zip(texts, out, strict=True)]

    db = f"sqlite:///{tmp_path / 'news.sqlite'}"
    news = tmp_path / "news.jsonl"
    news.write_text("\n".join(json.dumps(r) for r in (
        {"id": "n-ok", "published": "2024-05-01T10:00:00", "source": "wire",
         "tickers": ["AAPL"], "headline": "$AAPL beats estimates, shares jump"},
        {"id": "n-failed", "published": "2024-05-01T11:00:00", "source": "wire",
         "tickers": ["AAPL"], "headline": "$AAPL faces probe <b>über</b> accounts"})) + "\n")
    with Ledger(db) as ledger:
        with NewsStore(ledger.url) as store:
            classify_file(news, FailsOnProbe(), tmp_path / "n.parquet", ledger=ledger,
                          store=store)
        found = {d["subject_id"]: d for d in ledger.decisions(kind="sentiment")}
    monkeypatch.setenv("FINSENTINEL_DB", db)
    return {"db": db, "ok": found["n-ok"], "failed": found["n-failed"]}


def test_case_page_of_a_news_decision_shows_the_article_not_card_fields(news_env):
    ok = news_env["ok"]
    at = _sign_in(_app(page="Case", decision=ok["decision_id"]))
    assert not at.exception and not at.error
    shown = _unescaped(" ".join([m.value for m in at.markdown] + [c.value for c in at.caption]))
    assert "$AAPL beats estimates, shares jump" in shown
    facts = dict(_table(at, "field", "value").values)
    assert "card" not in facts and "terminal" not in facts and "amount" not in facts
    assert facts["source"] == "wire" and facts["model version"] == "lexicon@test"
    metrics = {m.label: m.value for m in at.metric}
    assert "Amount" not in metrics and metrics["Label"] == "positive"
    probabilities = _table(at, "label", "probability")
    assert dict(probabilities.values) == pytest.approx(ok["explanation"]["probabilities"])
    words = _table(at, "word", "weight")
    assert list(words["word"]) == ["beats", "jump"]
    assert [b.label for b in at.button if b.label != "Sign out"] == ["confirmed", "incorrect"]


def test_case_page_of_a_failed_llm_decision_says_why_it_has_no_label(news_env):
    failed = news_env["failed"]
    at = _sign_in(_app(page="Case", decision=failed["decision_id"]))
    assert not at.exception
    [warning] = at.warning
    assert "answer outside the schema after 3 attempts" in warning.value
    assert "No label" in warning.value
    [headline] = [m.value for m in at.markdown if "faces probe" in m.value]
    _shown_as_text(headline, "$AAPL faces probe <b>über</b> accounts")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Label"] == "failed" and "Score" not in metrics


def test_a_review_of_a_decision_whose_record_fails_its_hash_is_refused(app_env, tmp_path,
                                                                      monkeypatch):
    db = _copy_ledger(app_env, tmp_path)
    with Ledger(db) as ledger:
        target = ledger.decisions(kind="fraud")[5]
    engine = sa.create_engine(db)
    with engine.begin() as conn:  # an edit behind the ledger's back
        conn.execute(sa.text("UPDATE decisions SET score = 0.01 WHERE decision_id = :d"),
                     {"d": target["decision_id"]})
    engine.dispose()
    monkeypatch.setenv("FINSENTINEL_DB", db)
    at = _sign_in(_app(page="Case", decision=target["decision_id"]))
    assert not at.exception
    assert any("does not match its hash" in e.value for e in at.error)
    assert not [b for b in at.button if b.label == "false-positive"] or \
        at.button(key="review_false-positive").disabled
    with Ledger(db) as ledger:
        assert ledger.feedback(decision_id=target["decision_id"]) == []


def test_a_review_goes_to_the_case_on_screen_not_an_id_edited_with_the_click(app_env, tmp_path,
                                                                            monkeypatch):
    """The analyst reads case A, types B into the id box and clicks a review button before
    B is shown: the browser sends both at once. B was never on screen: nothing is recorded."""
    db = _copy_ledger(app_env, tmp_path)
    monkeypatch.setenv("FINSENTINEL_DB", db)
    with Ledger(db) as ledger:
        first, second = ledger.decisions(kind="fraud")[:2]
        before = ledger.feedback()
    at = _sign_in(_app(page="Case", decision=first["decision_id"]))
    at.text_input(key="case_id").set_value(second["decision_id"])
    at.button(key="review_confirmed-fraud").click().run()
    assert not at.exception
    with Ledger(db) as ledger:
        assert ledger.feedback() == before
    assert any("nothing was recorded" in w.value for w in at.warning)
    at.button(key="review_confirmed-fraud").click().run()  # now B is on screen
    with Ledger(db) as ledger:
        assert [(r["decision_id"], r["label"]) for r in ledger.feedback()[len(before):]] == [
            (second["decision_id"], "confirmed-fraud")]


def test_a_double_click_on_a_review_button_records_one_review(app_env, tmp_path, monkeypatch):
    db = _copy_ledger(app_env, tmp_path)
    monkeypatch.setenv("FINSENTINEL_DB", db)
    with Ledger(db) as ledger:
        reviewed = {r["decision_id"] for r in ledger.feedback()}
        target = next(d for d in ledger.decisions(kind="fraud")
                      if d["decision_id"] not in reviewed)
    at = _sign_in(_app(page="Case", decision=target["decision_id"]))
    at.text_area(key="review_comment").input("called the card holder")
    at.button(key="review_confirmed-fraud").click().run()
    at.button(key="review_confirmed-fraud").click().run()  # the second click of a double click
    assert not at.exception
    with Ledger(db) as ledger:
        reviews = ledger.feedback(decision_id=target["decision_id"])
    assert [(r["label"], r["comment"]) for r in reviews] == [
        ("confirmed-fraud", "called the card holder")]
    at.button(key="review_false-positive").click().run()  # a different label is a new review
    with Ledger(db) as ledger:
        assert len(ledger.feedback(decision_id=target["decision_id"])) == 2


def test_a_missing_sqlite_ledger_is_named_not_created(app_env, tmp_path, monkeypatch):
    missing = tmp_path / "typo" / "ledger.sqlite"
    monkeypatch.setenv("FINSENTINEL_DB", f"sqlite:///{missing}")
    at = _sign_in(_app())
    assert not at.exception
    [error] = at.error
    assert _unescaped(error.value).startswith(f"No ledger at {missing} (nothing was created")
    assert not missing.exists() and not missing.parent.exists()


def test_a_ledger_failing_mid_session_shows_an_error_not_a_traceback(app_env, monkeypatch):
    at = _sign_in(_app())
    assert at.dataframe

    def unreachable(self, *args, **kwargs):
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    monkeypatch.setattr(DashboardQueries, "fraud_days", unreachable)
    at.run()
    assert not at.exception
    assert any("server closed the connection" in e.value for e in at.error)


def test_an_export_prepared_for_one_search_is_not_offered_after_the_search_changes(app_env):
    at = _sign_in(_app(page="Audit"))
    at.text_input(key="audit_outcome").input("alert").run()
    at.button(key="export").click().run()
    assert at.session_state["export_ready"]["rows"] > 0
    assert [b for b in at.get("download_button")]
    at.text_input(key="audit_outcome").input("pass").run()
    assert not at.get("download_button")
    at.selectbox(key="export_format").select("jsonl").run()
    assert not at.get("download_button")


def test_an_html_export_is_capped_like_the_cli_and_reads_reviews_in_bulk(app_env, monkeypatch):
    """An HTML case report of thousands of cases is refused (as `audit export` refuses more
    than 2,000), and the reviews of the cases it does render come in one query per chunk, not
    one query per decision."""
    from pipeline import audit

    at = _sign_in(_app(page="Audit"))
    at.selectbox(key="export_format").select("html").run()
    at.button(key="export").click().run()
    assert not at.exception and "export_ready" not in at.session_state
    [error] = at.error
    assert "at most 2,000" in _unescaped(error.value)

    calls = []
    original = Ledger.feedback
    monkeypatch.setattr(Ledger, "feedback",
                        lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    at.text_input(key="audit_outcome").input("alert").run()
    at.button(key="export").click().run()
    assert not at.exception and not at.error
    ready = at.session_state["export_ready"]
    page = ready["data"].decode()
    assert ready["rows"] > 50 and page.count('<section class="case"') == ready["rows"]
    assert len(calls) <= 1
    assert audit.render_case_report  # the same renderer as the CLI


def test_parallel_sign_in_attempts_cannot_get_past_the_failure_limit():
    """Checking the count and recording a failure were two steps: password guesses sent in
    parallel all passed the check before any failure was recorded. An attempt now reserves
    its place in the count before the password is checked."""
    import threading

    from pipeline.dashboard.auth import SignInThrottle

    throttle = SignInThrottle(max_failures=5, window_s=600)
    barrier, allowed = threading.Barrier(20), []

    def guess():
        barrier.wait()
        if throttle.attempt("alice") == 0:
            allowed.append(1)  # the password check would run here, and fail

    threads = [threading.Thread(target=guess) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 5 and throttle.retry_after("alice") > 0
    throttle.succeeded("alice")  # the right password clears the name's count
    assert throttle.attempt("alice") == 0


def test_an_idle_session_is_signed_out(app_env, monkeypatch):
    """A browser left open: after $FINSENTINEL_DASHBOARD_IDLE_MINUTES without an action the
    next action finds the sign-in form, not the ledger; an active session stays in."""
    monkeypatch.setenv("FINSENTINEL_DASHBOARD_IDLE_MINUTES", "15")
    at = _sign_in(_app())
    assert at.session_state["user"] == USER and len(at.dataframe) == 1
    at.session_state["last_action"] = time.monotonic() - 14 * 60  # active 14 minutes ago
    at.run()
    assert at.session_state["user"] == USER and len(at.dataframe) == 1
    at.session_state["last_action"] = time.monotonic() - 16 * 60
    at.run()
    assert not at.exception
    assert "user" not in at.session_state
    assert [i.value for i in at.info] == [
        "Signed out after 15 minutes without activity: sign in again."]
    _shows_no_data(at)
    _sign_in(at)
    assert at.session_state["user"] == USER and len(at.dataframe) == 1

    monkeypatch.setenv("FINSENTINEL_DASHBOARD_IDLE_MINUTES", "0")  # never
    at.session_state["last_action"] = time.monotonic() - 10 * 24 * 3600
    at.run()
    assert at.session_state["user"] == USER


@pytest.mark.parametrize("value", ["soon", "-5", "nan"])
def test_a_bad_idle_time_out_is_refused(app_env, monkeypatch, value):
    from pipeline.dashboard.auth import IDLE_ENV, AuthConfigError, idle_minutes

    with pytest.raises(AuthConfigError, match=IDLE_ENV):
        idle_minutes({IDLE_ENV: value})
    assert idle_minutes({IDLE_ENV: " "}) == 30.0
    monkeypatch.setenv(IDLE_ENV, value)
    at = _app()
    at.run()
    assert IDLE_ENV in at.error[0].value and len(at.text_input) == 0
