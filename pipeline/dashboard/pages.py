"""The dashboard's pages. Nothing from the ledger is read, and no database is opened, before an
analyst has signed in: :func:`main` stops at the sign-in form for every page and every URL."""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from pipeline.dashboard.auth import AuthConfigError, SignInThrottle, Users
from pipeline.dashboard.queries import (
    AlertFilter,
    DashboardQueries,
    SearchFilter,
    artifact_manifests,
    evaluation_reports,
    neighbour_features,
)

EVALUATIONS_ENV = "FINSENTINEL_EVALUATIONS"
PAGES = ("Alerts", "Case", "Sentiment", "Models and data", "Audit")
EXPORT_MAX_ROWS = 50_000
EXPORT_MAX_CASES = 2_000  # an HTML case report: as `finsentinel audit export` (max_cases)
LABEL_NAMES = {1: "fraud", 0: "genuine"}
_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def plain(value: object) -> str:
    """``value`` as literal text inside Markdown (headings, captions, alerts, labels), which
    Streamlit renders with links, images, ``$`` math and ``:color[...]`` directives: ids,
    headlines and URL parameters come from feeds and links, so each ASCII punctuation
    character is backslash-escaped and line breaks become spaces."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(value).splitlines()))


@dataclass(frozen=True)
class Settings:
    """Where the dashboard reads from: all from the environment ``finsentinel dashboard`` set
    (the database URL never goes through argv)."""

    db: str | None
    indexes: Path
    models: Path
    evaluations: Path

    @classmethod
    def from_env(cls) -> Settings:
        from pipeline.index import INDEXES_ENV
        from pipeline.ledger import DEFAULT_DB_ENV
        from pipeline.sentiment.backends import MODELS_ENV
        from pipeline.settings import JobSettings

        env = os.environ
        # Evaluations: where the weekly flow writes them ($FINSENTINEL_EVALUATIONS, else
        # $FINSENTINEL_WORKDIR/evaluations), so the page finds what the schedule produced.
        return cls(db=env.get(DEFAULT_DB_ENV) or None,
                   indexes=Path(env.get(INDEXES_ENV) or "indexes"),
                   models=Path(env.get(MODELS_ENV) or "models"),
                   evaluations=JobSettings.from_env(env).evaluations)


class MissingLedger(LookupError):
    """The database the dashboard was pointed at holds no ledger (nothing is created)."""


@st.cache_resource(show_spinner=False)
def _queries(url: str | None) -> DashboardQueries:
    from pipeline.audit import missing_ledger
    from pipeline.ledger import Ledger

    # Opening a ledger creates one where there is none: a mistyped --db would show an empty,
    # "intact" ledger (and leave a new file behind). Not cached when missing: it may appear.
    where = missing_ledger(url)
    if where is not None:
        raise MissingLedger(where)
    return DashboardQueries(Ledger(url))


@st.cache_resource(show_spinner=False)
def _users(text: str | None) -> Users:
    return Users.parse(text)


@st.cache_resource(show_spinner=False)
def _throttle() -> SignInThrottle:
    """One for the server process: failed sign-ins count across every browser session."""
    return SignInThrottle()


# --- sign-in ---------------------------------------------------------------------------------

def _sign_in(users: Users, idle_minutes: float = 0.0) -> str | None:
    """The signed-in analyst, or None after drawing the sign-in form. A session with no action
    for ``idle_minutes`` (0: never) is signed out first (a browser left open on a shared desk)."""
    user = st.session_state.get("user")
    now = time.monotonic()
    if user and idle_minutes and now - st.session_state.get("last_action", now) > \
            idle_minutes * 60:
        _sign_out()
        st.session_state["signed_out_idle"] = idle_minutes
        user = None
    if user:
        st.session_state["last_action"] = now
        return user
    st.title("finsentinel")
    idle = st.session_state.pop("signed_out_idle", None)
    if idle is not None:
        st.info(f"Signed out after {idle:g} minutes without activity: sign in again.")
    st.caption("Sign in to see alerts, cases and the audit ledger.")
    with st.form("login"):
        name = st.text_input("User", key="login_user")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        throttle = _throttle()
        wait = throttle.attempt(name or "")  # counted as a failure until it succeeds
        if wait > 0:
            st.error(f"Too many failed sign-ins for this user: try again in "
                     f"{math.ceil(wait / 60)} minute(s).")
            return None
        found = users.authenticate(name or "", password or "")
        if found:
            throttle.succeeded(name or "")
            st.session_state["user"] = found
            st.session_state["last_action"] = time.monotonic()
            st.session_state.pop("login_password", None)
            st.rerun()
        st.error("Unknown user or wrong password.")
    return None


def _sign_out() -> None:
    for key in list(st.session_state):
        del st.session_state[key]


def main() -> None:
    st.set_page_config(page_title="finsentinel", layout="wide")
    from pipeline.dashboard.auth import USERS_ENV, idle_minutes

    try:
        users = _users(os.environ.get(USERS_ENV))
        idle = idle_minutes()
    except AuthConfigError as exc:
        st.error(str(exc))
        st.stop()
        return
    user = _sign_in(users, idle)
    if user is None:
        st.stop()

    settings = Settings.from_env()
    wanted = st.query_params.get("page")
    if "page" not in st.session_state:
        st.session_state["page"] = wanted if wanted in PAGES else PAGES[0]
    if "case_id" not in st.session_state and st.query_params.get("decision"):
        st.session_state["case_id"] = st.query_params.get("decision")
    with st.sidebar:
        st.markdown(f"Signed in as **{user}**")
        st.button("Sign out", on_click=_sign_out, key="sign_out")
        page = st.radio("Page", PAGES, key="page")
    from pipeline.privacy import redact_url

    try:
        queries = _queries(settings.db)
    except MissingLedger as exc:
        st.error(f"No ledger at {plain(exc.args[0])} (nothing was created there): check "
                 f"{plain('--db / $FINSENTINEL_DB')}, or score a batch first (`finsentinel "
                 "score`).")
        st.stop()
    except Exception as exc:  # an unreachable database: say which, without the password
        st.error(f"cannot open the ledger {plain(redact_url(settings.db or 'default'))}: "
                 f"{type(exc).__name__}: {plain(_first_line(exc))}")
        st.stop()
    try:
        {"Alerts": alerts_page, "Case": case_page, "Sentiment": sentiment_page,
         "Models and data": models_page, "Audit": audit_page}[page](queries, settings, user)
    except SQLAlchemyError as exc:  # the database went away (or a query failed) mid-session
        st.error(f"cannot read the ledger {plain(redact_url(queries.ledger.url))}: "
                 f"{type(exc).__name__}: {plain(_first_line(exc))}. Reload the page to retry.")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


# --- alerts ----------------------------------------------------------------------------------

def _open_case(decision_id: str) -> None:
    st.session_state["case_id"] = decision_id
    st.session_state["page"] = "Case"


def alerts_page(queries: DashboardQueries, settings: Settings, user: str) -> None:
    st.header("Alerts")
    days = queries.fraud_days()
    if not days:
        st.info("No fraud decisions in the ledger yet: score a batch (`finsentinel score`).")
        return
    c1, c2, c3, c4, c5 = st.columns([1.2, 1, 1.2, 1, 0.8])
    day = c1.selectbox("Transactions of (UTC)", days, key="alert_day",
                       format_func=lambda d: d.isoformat())
    min_score = c2.slider("Minimum score", 0.0, 1.0, 0.0, 0.01, key="alert_min_score")
    merchant = c3.text_input("Merchant (name or terminal id)", key="alert_merchant")
    channel = c4.selectbox("Channel", ["any", *queries.channels()], key="alert_channel")
    budget = c5.number_input("Cards", 1, 1000, 100, key="alert_budget",
                             help="Alert budget: the day's N highest-scoring cards.")
    flt = AlertFilter(day=day, min_score=float(min_score), merchant=merchant or None,
                      channel=None if channel == "any" else channel, budget=int(budget))
    page_no = int(st.session_state.get("alert_page", 1)) - 1
    result = queries.alerts(flt, page=page_no)
    st.caption(f"{result.cards} cards in the queue for {day.isoformat()}: each card's "
               "highest-scoring transaction, highest first. Status is the latest review.")
    if not result.rows:
        st.info("No decision matches these filters.")
        return
    frame = pd.DataFrame(result.rows)
    st.dataframe(
        frame[["rank", "card", "transaction", "score", "threshold", "decision", "amount",
               "merchant", "channel", "reasons", "status"]],
        hide_index=True, key="alerts_table",
        column_config={"score": st.column_config.ProgressColumn(
            "score", min_value=0.0, max_value=1.0, format="%.4f"),
            "threshold": st.column_config.NumberColumn(format="%.4f"),
            "amount": st.column_config.NumberColumn(format="%.2f"),
            "reasons": st.column_config.TextColumn(width="large")})
    c1, c2, c3 = st.columns([1, 2.5, 1])
    c1.number_input(f"Page (of {result.pages})", 1, result.pages, result.page + 1,
                    key="alert_page")
    options = {f"#{r['rank']} {r['transaction']} (score {r['score']:.4f})": r["decision_id"]
               for r in result.rows}
    chosen = c2.selectbox("Case", list(options), key="alert_case")
    c3.button("Open case", key="open_case", type="primary", on_click=_open_case,
              args=(options[chosen],))


# --- one case --------------------------------------------------------------------------------

def _score_chart(score: float, threshold: float) -> alt.Chart:
    data = pd.DataFrame({"what": ["score"], "value": [score]})
    bar = alt.Chart(data).mark_bar(size=22, color="#c0392b" if score >= threshold
                                   else "#2e7d32").encode(
        x=alt.X("value:Q", scale=alt.Scale(domain=[0, 1]), title=None), y=alt.Y("what:N",
                                                                                title=None))
    rule = alt.Chart(pd.DataFrame({"threshold": [threshold]})).mark_rule(
        color="black", strokeWidth=2, strokeDash=[4, 2]).encode(x="threshold:Q")
    return (bar + rule).properties(height=60)


def neighbourhood_points(query: dict[str, float], neighbours: list[dict[str, Any]],
                         features: dict[str, dict[str, float]]) -> pd.DataFrame | None:
    """The case and its neighbours in 2-D: the first two principal components of their
    standardised feature vectors (None when the neighbours' features are not available)."""
    names = [n for n in query if query[n] is not None]
    rows = [n for n in neighbours if n["transaction_id"] in features]
    if len(rows) < 2 or len(names) < 2:
        return None
    matrix = np.array([[query[n] for n in names]]
                      + [[features[r["transaction_id"]].get(n) or 0.0 for n in names]
                         for r in rows], dtype=np.float64)
    matrix = (matrix - matrix.mean(0)) / np.where(matrix.std(0) > 0, matrix.std(0), 1.0)
    _, _, vt = np.linalg.svd(matrix - matrix.mean(0), full_matrices=False)
    xy = matrix @ vt[:2].T
    return pd.DataFrame({
        "pc1": xy[:, 0], "pc2": xy[:, 1] if xy.shape[1] > 1 else 0.0,
        "what": ["this transaction"] + [LABEL_NAMES.get(r["is_fraud"], "?") for r in rows],
        "transaction": ["(case)"] + [r["transaction_id"] for r in rows],
        "similarity": [1.0] + [r["similarity"] for r in rows]})


def case_page(queries: DashboardQueries, settings: Settings, user: str) -> None:
    st.header("Case")
    # The case the analyst had on screen when they clicked (the previous run drew it): a
    # review button pressed together with an edited id must not land on the new id.
    on_screen = st.session_state.get("case_on_screen")
    st.session_state["case_on_screen"] = None
    decision_id = st.text_input("Decision id", key="case_id",
                                help="Open one from the Alerts page, or paste an id.")
    if not decision_id or not decision_id.strip():
        st.info("Pick a case on the Alerts page, or paste a decision id.")
        return
    case = queries.case(decision_id)
    if case is None:
        st.error(f"No decision {plain(repr(decision_id.strip()))} in the ledger.")
        return
    reviews = case["reviews"]
    status = reviews[-1]["label"] if reviews else "open"
    st.subheader(f"{plain(case['kind'])} decision on {plain(case['subject_id'])}: "
                 f"{plain(case['decision'].upper())}")
    if case["kind"] == "fraud":
        _fraud_case(case, settings, status)
    else:
        _news_case(case, status)
    _reviews(queries, case, user, on_screen)
    st.session_state["case_on_screen"] = case["decision_id"]


def _fraud_case(case: dict[str, Any], settings: Settings, status: str) -> None:
    explanation, inputs = case["explanation"], case["inputs"] or {}
    tx = inputs.get("transaction") or {}
    score, threshold = float(case["score"]), float(case["threshold"])
    m = st.columns(5)
    m[0].metric("Score", f"{score:.4f}")
    m[1].metric("Threshold", f"{threshold:.4f}")
    m[2].metric("Score - threshold", f"{score - threshold:+.4f}")
    m[3].metric("Amount", f"{tx.get('amount', float('nan')):,.2f}" if tx.get("amount")
                is not None else "-")
    m[4].metric("Status", status)
    st.altair_chart(_score_chart(score, threshold), width="stretch")
    facts = {"card": tx.get("customer_id"), "terminal": tx.get("terminal_id"),
             "merchant": tx.get("merchant_name"), "channel": tx.get("channel"),
             "transaction time": tx.get("tx_time"), "batch": case["batch_id"],
             "recorded at": case["created_at"], "model version": case["model_version"],
             "index version": case["index_version"], "decision id": case["decision_id"],
             "record hash": case["hash"]}
    st.dataframe(pd.DataFrame({"field": list(facts), "value": [str(v) for v in facts.values()]}),
                 hide_index=True, key="case_facts")

    neighbours = explanation.get("neighbours") or []
    left, right = st.columns(2)
    with left:
        st.markdown(f"**Nearest labelled neighbours** (the {len(neighbours)} most similar of "
                    f"{explanation.get('neighbours_used', '?')} used, k="
                    f"{explanation.get('k', '?')}; fraud weight "
                    f"{explanation.get('fraud_weight', 0):.3f} of "
                    f"{explanation.get('total_weight', 0):.3f})")
        if neighbours:
            table = pd.DataFrame(neighbours)
            table["label"] = table["is_fraud"].map(LABEL_NAMES)
            st.dataframe(table[["transaction_id", "similarity", "label", "tx_time"]],
                         hide_index=True, key="case_neighbours")
    with right:
        st.markdown("**Neighbourhood**")
        query_features = inputs.get("features") or {
            k: v.get("value") for k, v in (explanation.get("features") or {}).items()}
        stored = neighbour_features(settings.indexes, case["index_version"],
                                    [n["transaction_id"] for n in neighbours])
        points = neighbourhood_points(query_features, neighbours, stored)
        colours = alt.Scale(domain=["this transaction", "fraud", "genuine"],
                            range=["#1f4e9c", "#c0392b", "#8fa3b8"])
        if points is not None:
            st.altair_chart(alt.Chart(points).mark_point(filled=True).encode(
                x=alt.X("pc1:Q", title="principal component 1"),
                y=alt.Y("pc2:Q", title="principal component 2"),
                color=alt.Color("what:N", scale=colours, title=None),
                shape=alt.Shape("what:N", title=None),
                size=alt.Size("similarity:Q", scale=alt.Scale(range=[60, 260]), legend=None),
                tooltip=["transaction", "what", "similarity"]).properties(height=300),
                width="stretch")
            st.caption("The case and its neighbours on the first two principal components of "
                       "their standardised numeric features (the search vector also holds "
                       "the text embedding); larger = more similar.")
        elif neighbours:
            frame = pd.DataFrame({"rank": range(1, len(neighbours) + 1),
                                  "similarity": [n["similarity"] for n in neighbours],
                                  "what": [LABEL_NAMES.get(n["is_fraud"], "?")
                                           for n in neighbours],
                                  "transaction": [n["transaction_id"] for n in neighbours]})
            st.altair_chart(alt.Chart(frame).mark_circle(size=120).encode(
                x=alt.X("rank:O", title="neighbour rank"),
                y=alt.Y("similarity:Q", scale=alt.Scale(zero=False)),
                color=alt.Color("what:N", scale=colours, title=None),
                tooltip=["transaction", "similarity"]).properties(height=300), width="stretch")
            st.caption(f"Index {case['index_version']} is not under {settings.indexes}: "
                       "similarity by rank instead of the feature-space picture.")

    features = explanation.get("features") or {}
    if features:
        st.markdown(f"**Features against the card's history** (its mean over "
                    f"{explanation.get('card_history_transactions', 0)} indexed transactions)")
        frame = pd.DataFrame([{"feature": k, "this transaction": v.get("value"),
                               "card usual": v.get("card_usual")} for k, v in features.items()])
        known = frame.dropna()
        known = known[known["card usual"].abs() > 1e-9].copy()
        if len(known):
            known["ratio"] = known["this transaction"] / known["card usual"]
            st.altair_chart(alt.Chart(known).mark_bar().encode(
                x=alt.X("ratio:Q", title="this transaction / card's usual value"),
                y=alt.Y("feature:N", sort="-x", title=None, axis=alt.Axis(labelLimit=320)),
                color=alt.condition("datum.ratio > 1.5", alt.value("#c0392b"),
                                    alt.value("#8fa3b8")),
                tooltip=["feature", "this transaction", "card usual", "ratio"])
                + alt.Chart(pd.DataFrame({"x": [1.0]})).mark_rule(color="black").encode(x="x:Q"),
                width="stretch")
        st.dataframe(frame, hide_index=True, key="case_features")
    model = explanation.get("model")
    if model:
        st.markdown("**Stacked model contributions** (log-odds)")
        st.dataframe(pd.DataFrame(
            {"input": list(model.get("contributions_log_odds", {})),
             "contribution": list(model.get("contributions_log_odds", {}).values())}),
            hide_index=True, key="case_model")


REPEAT_WINDOW_S = 30.0  # an identical review by the same analyst this soon is a repeated click


def _news_case(case: dict[str, Any], status: str) -> None:
    """A news classification: the article, the label's probabilities and why (the words that
    moved it, the nearest training texts, an LLM's rationale), or why there is no label."""
    explanation, inputs = case["explanation"], case["inputs"] or {}
    failure = explanation.get("failure")
    st.markdown(f"**{plain(inputs.get('headline') or '(no headline recorded)')}**")
    body = inputs.get("body") or ""
    if body:
        st.caption(plain(body[:600] + ("…" if len(body) > 600 else "")))
    if failure:
        st.warning(f"No label: {plain(failure)}")
    m = st.columns(3)
    m[0].metric("Label", str(case["decision"]))
    if not failure:
        m[1].metric("Confidence", f"{float(case['score']):.4f}")
        if explanation.get("signed_score") is not None:
            m[2].metric("Signed score (positive - negative)",
                        f"{float(explanation['signed_score']):+.3f}")
    st.metric("Status", status)
    facts = {"news id": case["subject_id"],
             "published": inputs.get("published_at") or case.get("subject_time"),
             "source": inputs.get("source"),
             "tickers": ", ".join(explanation.get("tickers") or []) or "none found",
             "texts classified": explanation.get("units"), "batch": case["batch_id"],
             "recorded at": case["created_at"], "model version": case["model_version"],
             "decision id": case["decision_id"], "record hash": case["hash"]}
    st.dataframe(pd.DataFrame({"field": list(facts), "value": [str(v) for v in facts.values()]}),
                 hide_index=True, key="case_facts")
    probabilities = explanation.get("probabilities") or {}
    if probabilities:
        st.markdown("**Probabilities**")
        st.dataframe(pd.DataFrame({"label": list(probabilities),
                                   "probability": [float(p) for p in probabilities.values()]}),
                     hide_index=True, key="case_probabilities")
    if explanation.get("rationale"):
        st.markdown("**The model's rationale**")
        st.text(str(explanation["rationale"]))
    attributions = explanation.get("attributions") or {}
    words = [w for w in attributions.get("words") or [] if isinstance(w, dict)]
    if words:
        st.markdown(f"**Words that moved the label** "
                    f"({plain(attributions.get('method') or 'attribution')})")
        st.dataframe(pd.DataFrame({"word": [str(w.get("word")) for w in words],
                                   "weight": [w.get("weight") for w in words]}),
                     hide_index=True, key="case_words")
    examples = explanation.get("nearest_training_examples") or []
    if examples:
        st.markdown("**Nearest labelled training texts**")
        st.dataframe(pd.DataFrame(examples), hide_index=True, key="case_examples")
    st.json({k: v for k, v in explanation.items()
             if k not in ("probabilities", "attributions", "nearest_training_examples",
                          "rationale")}, expanded=False)


def _reviews(queries: DashboardQueries, case: dict[str, Any], user: str,
             on_screen: str | None) -> None:
    from pipeline.ledger import LedgerError, review_labels

    reviews = case["reviews"]
    st.markdown("**Reviews**")
    if reviews:
        st.dataframe(pd.DataFrame(reviews)[["seq", "label", "reviewer", "comment",
                                            "created_at"]], hide_index=True, key="case_reviews")
    else:
        st.caption("Not reviewed yet.")
    # A review is bound to the decision's hash: never to a record that fails verification
    # (the review would vouch for the edited contents, and verify against them).
    problem = queries.record_problem(case["decision_id"])
    if problem is not None:
        st.error(f"This decision's ledger record {plain(problem)}. It cannot be reviewed: "
                 "run the chain verification on the Audit page and report it.")
        return
    labels = review_labels(case["kind"])
    with st.form("review", clear_on_submit=True):
        comment = st.text_area("Comment", key="review_comment")
        cols = st.columns(len(labels))
        clicked = [cols[i].form_submit_button(label, key=f"review_{label}")
                   for i, label in enumerate(labels)]
    for label, pressed in zip(labels, clicked, strict=True):
        if not pressed:
            continue
        if on_screen != case["decision_id"]:
            st.warning(f"The case changed to {plain(case['decision_id'])} as the "
                       f"{plain(label)} button was pressed, before it was shown: nothing was "
                       "recorded. Read this case, then review it.")
            break
        if _repeated(reviews, label, comment, user):
            st.info(f"{plain(label)} by {plain(user)} was just recorded for this decision: "
                    "not recorded again.")
            break
        try:
            # The same code path as `finsentinel audit review`; the reviewer is the
            # signed-in analyst, never a name typed into the form.
            receipt = queries.ledger.record_feedback(case["decision_id"], label,
                                                     comment or None, user)
        except LedgerError as exc:
            st.error(plain(str(exc)))
        else:
            st.session_state["review_done"] = (
                f"Review #{receipt.seq} recorded: {receipt.label} by {receipt.reviewer}.")
            st.rerun()
    if st.session_state.get("review_done"):
        st.success(st.session_state.pop("review_done"))


def _repeated(reviews: list[dict[str, Any]], label: str, comment: str | None,
              user: str) -> bool:
    """Whether this review repeats the decision's latest one: the same analyst and label
    within seconds, with no new comment (the second click of a double click: the form was
    cleared by the first)."""
    if not reviews:
        return False
    last = reviews[-1]
    if last["reviewer"] != user.strip() or last["label"] != label:
        return False
    if comment and comment.strip() and comment != (last.get("comment") or ""):
        return False
    try:
        recorded = datetime.fromisoformat(last["created_at"])
    except (TypeError, ValueError):
        return False
    if recorded.tzinfo is None:
        recorded = recorded.replace(tzinfo=UTC)
    return abs((datetime.now(UTC) - recorded).total_seconds()) < REPEAT_WINDOW_S


# --- sentiment -------------------------------------------------------------------------------

def sentiment_page(queries: DashboardQueries, settings: Settings, user: str) -> None:
    st.header("Sentiment")
    tickers = queries.tickers()
    if not tickers:
        st.info("No news sentiment in this database yet: run `finsentinel sentiment classify`.")
        return
    counts = {t["ticker"]: int(t["articles"]) for t in tickers}
    ticker = st.selectbox("Ticker", list(counts), key="sent_ticker",
                          format_func=lambda t: f"{t} ({counts[t]} articles)")
    daily = pd.DataFrame(queries.sentiment_daily(ticker))
    daily["day"] = pd.to_datetime(daily["day"])
    base = alt.Chart(daily).encode(x=alt.X("day:T", title=None))
    chart = (base.mark_line(color="#1f4e9c").encode(
        y=alt.Y("mean_score:Q", scale=alt.Scale(domain=[-1, 1]),
                title="mean sentiment (P(pos) - P(neg))"))
        + base.mark_circle(color="#1f4e9c").encode(
            y="mean_score:Q", size=alt.Size("articles:Q", title="articles"),
            tooltip=["day:T", "mean_score:Q", "articles:Q", "positive:Q", "negative:Q",
                     "neutral:Q"])
        + alt.Chart(pd.DataFrame({"y": [0]})).mark_rule(color="#999").encode(y="y:Q"))
    st.altair_chart(chart.properties(height=280), width="stretch")
    days = sorted(daily["day"].dt.date, reverse=True)
    day = st.selectbox("Headlines of", days, key="sent_day",
                       format_func=lambda d: d.isoformat())
    row = daily[daily["day"].dt.date == day].iloc[0]
    st.caption(f"{ticker} on {day.isoformat()}: mean {row['mean_score']:+.3f} over "
               f"{int(row['articles'])} articles ({int(row['positive'])} positive, "
               f"{int(row['negative'])} negative, {int(row['neutral'])} neutral)")
    found = queries.headlines(ticker, day)
    st.dataframe(pd.DataFrame([{"published": h["published_at"], "headline": h["headline"],
                                "label": h["label"], "score": h["score"],
                                "source": h["source"]} for h in found]),
                 hide_index=True, key="sent_headlines",
                 column_config={"headline": st.column_config.TextColumn(width="large")})
    for h in found:
        with st.expander(f"{plain(h['label'])}: {plain(h['headline'])}"):
            explanation = h["explanation"]
            words = (explanation.get("attributions") or {}).get("words") or []
            if words:
                st.markdown("Words that moved the label (occlusion): " + ", ".join(
                    plain(w.get("word", w) if isinstance(w, dict) else w) for w in words[:8]))
            examples = explanation.get("nearest_training_examples") or []
            if examples:
                st.markdown("Nearest training examples:")
                st.dataframe(pd.DataFrame(examples), hide_index=True)
            st.json({k: v for k, v in explanation.items()
                     if k in ("probabilities", "signed_score", "model_id", "units",
                              "aggregation", "failure")}, expanded=False)


# --- models and data -------------------------------------------------------------------------

@st.cache_data(show_spinner="scoring the index's own history for the reference …", ttl=3600)
def _reference(root: str, index_version: str, k: int, smoothing: float,
               prior: float | None) -> np.ndarray:
    from pipeline.drift import index_reference_scores

    return index_reference_scores(root, index_version, k=k, smoothing=smoothing, prior=prior)


def _manifest_table(found: list[dict[str, Any]], fields: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for item in found:
        m = item.get("manifest") or {}
        row = {"name": item["name"], "version": item.get("version", "?"),
               "versions kept": item.get("versions")}
        row |= {f: json.dumps(m.get(f)) if isinstance(m.get(f), dict | list) else m.get(f)
                for f in fields}
        if "error" in item:
            row["error"] = item["error"]
        rows.append(row)
    return pd.DataFrame(rows)


def models_page(queries: DashboardQueries, settings: Settings, user: str) -> None:
    from pipeline import artifacts
    from pipeline.drift import psi

    st.header("Models and data")
    st.subheader(f"Indexes ({settings.indexes})")
    indexes = artifact_manifests(settings.indexes)
    if indexes:
        st.dataframe(_manifest_table(indexes, ("kind", "faiss_index", "vector_count",
                                               "fraud_count", "label_cutoff", "history_start",
                                               "history_end")),
                     hide_index=True, key="index_manifests")
        for item in indexes:
            with st.expander(f"manifest of {item['name']}@{item.get('version', '?')}"):
                st.json(item.get("manifest") or item, expanded=False)
                if st.button("Verify files against the manifest", key=f"verify_{item['name']}"):
                    try:
                        artifacts.resolve(settings.indexes, item["name"], item.get("version"))
                        st.success("every file matches its sha256 in the manifest")
                    except artifacts.ArtifactError as exc:
                        st.error(str(exc))
    else:
        st.caption("No index under this root.")
    st.subheader(f"Models ({settings.models})")
    models = artifact_manifests(settings.models)
    if models:
        st.dataframe(_manifest_table(models, ("kind", "model_id", "base_model", "created_at")),
                     hide_index=True, key="model_manifests")
    else:
        st.caption("No model under this root.")

    st.subheader("Score drift of the latest batch")
    batch = queries.latest_batch()
    if batch is None:
        st.caption("No fraud batch in the ledger yet.")
    else:
        _drift(queries, settings, batch, psi)

    st.subheader(f"Evaluation results ({settings.evaluations})")
    reports = evaluation_reports(settings.evaluations)
    if not reports:
        st.caption("No evaluation report here (write one with `finsentinel evaluate --output "
                   f"{settings.evaluations}/NAME.json`).")
        return
    rows = []
    for r in reports:
        s = r["summary"]
        rows.append({"file": r["file"], "scorer": r.get("scorer"), "folds": len(r["folds"])}
                    | {f"{k} mean": v.get("mean") for k, v in s.items()}
                    | {f"{k} std": v.get("std") for k, v in s.items()})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="evaluations")


def _drift(queries: DashboardQueries, settings: Settings, batch: dict[str, Any], psi) -> None:
    scored = queries.batch_scores(batch["batch_id"])
    config = scored["settings"]
    actual = np.array(scored["knn_scores"])
    reference, source = None, ""
    if scored["index_version"] and config.get("k"):
        try:
            prior = config.get("prior") if config.get("prior_source") == "config" else None
            reference = _reference(str(settings.indexes), scored["index_version"],
                                   int(config["k"]), float(config.get("smoothing", 1.0)), prior)
            source = (f"index {scored['index_version']}'s own history ({len(reference):,} "
                      "sampled rows, leave-one-out kNN scores; history rows have their own "
                      "card's other transactions as close neighbours, so they tend to score "
                      "lower than new transactions: follow the PSI from batch to batch rather "
                      "than reading one value against the thresholds alone)")
        except Exception as exc:  # the index is not on disk here: fall back, and say so
            st.caption(f"training reference unavailable ({exc})")
    if reference is None:
        previous = queries.latest_batch(before=batch["created_at"])
        if previous is None:
            st.caption(f"Batch {plain(batch['batch_id'])}: no reference to compare with (no "
                       "index on disk and no earlier batch).")
            return
        reference = np.array(queries.batch_scores(previous["batch_id"])["knn_scores"])
        source = f"the previous batch {plain(previous['batch_id'])}"
    result = psi(reference, actual)
    c1, c2, c3 = st.columns(3)
    c1.metric("PSI", f"{result.value:.3f}", help="< 0.1 stable, 0.1-0.25 moderate, > 0.25 "
                                                  "significant shift")
    c2.metric("Shift", result.level)
    c3.metric("Batch rows", f"{result.actual_n:,}")
    st.caption(f"Batch {plain(batch['batch_id'])} (recorded {batch['created_at']}) against "
               f"{source}; "
               "kNN scores, in bins cut at the reference's deciles (a score held by a tenth "
               "of the reference or more gets a bin of its own).")
    labels = [f"{_edge(lo)}-{_edge(hi)}" for lo, hi in zip(result.edges[:-1], result.edges[1:],
                                                           strict=True)]
    frame = pd.DataFrame({"bin": labels * 2, "order": list(range(len(labels))) * 2,
                          "share": result.expected_share + result.actual_share,
                          "distribution": ["reference"] * len(labels) + ["latest batch"]
                          * len(labels)})
    st.altair_chart(alt.Chart(frame).mark_bar().encode(
        x=alt.X("bin:N", sort=alt.SortField("order"), title="score bin"),
        xOffset="distribution:N", y=alt.Y("share:Q", axis=alt.Axis(format="%")),
        color=alt.Color("distribution:N", scale=alt.Scale(range=["#8fa3b8", "#c0392b"])),
        tooltip=["bin", "distribution", alt.Tooltip("share:Q", format=".1%")])
        .properties(height=260), width="stretch")


def _edge(value: float) -> str:
    return "-inf" if value == float("-inf") else "inf" if value == float("inf") \
        else f"{value:.3f}"


# --- audit -----------------------------------------------------------------------------------

def _search_filter() -> SearchFilter:
    s = st.session_state
    since = s.get("audit_from")
    until = s.get("audit_to")
    return SearchFilter(
        decision_id=s.get("audit_decision") or None, subject_id=s.get("audit_subject") or None,
        batch_id=s.get("audit_batch") or None,
        kind=None if s.get("audit_kind", "any") == "any" else s.get("audit_kind"),
        decision=s.get("audit_outcome") or None,
        since=datetime(since.year, since.month, since.day) if since else None,
        until=(datetime(until.year, until.month, until.day) + timedelta(days=1)) if until
        else None)


def _reset_cursor() -> None:
    st.session_state["audit_cursor"] = (None, None)


def audit_page(queries: DashboardQueries, settings: Settings, user: str) -> None:
    st.header("Audit")
    head = queries.ledger_head()
    st.caption(f"Ledger head: decision seq {head['head_seq']} ({(head['head_hash'] or '')[:16]}…)"
               f", review seq {head['feedback_head_seq']}; schema version "
               f"{head['schema_version']}.")
    c = st.columns(6)
    c[0].text_input("Decision id", key="audit_decision", on_change=_reset_cursor)
    c[1].text_input("Subject (transaction / news id)", key="audit_subject",
                    on_change=_reset_cursor)
    c[2].text_input("Batch", key="audit_batch", on_change=_reset_cursor)
    c[3].selectbox("Kind", ["any", "fraud", "sentiment"], key="audit_kind",
                   on_change=_reset_cursor)
    c[4].date_input("From (UTC)", value=None, key="audit_from", on_change=_reset_cursor)
    c[5].date_input("To (UTC, inclusive)", value=None, key="audit_to", on_change=_reset_cursor)
    st.text_input("Outcome (alert, pass, positive, …)", key="audit_outcome",
                  on_change=_reset_cursor)
    flt = _search_filter()
    before, after = st.session_state.get("audit_cursor", (None, None))
    page = queries.search(flt, before=before, after=after)
    if page.rows:
        st.dataframe(pd.DataFrame(page.rows)[
            ["seq", "created_at", "kind", "subject_id", "score", "threshold", "decision",
             "review", "reviewer", "batch_id", "decision_id", "index_version"]],
            hide_index=True, key="audit_results")
    else:
        st.info("No decision matches.")
    n1, n2, _ = st.columns([1, 1, 4])
    if n1.button("Newer", key="audit_newer", disabled=page.after is None):
        st.session_state["audit_cursor"] = (None, page.after)
        st.rerun()
    if n2.button("Older", key="audit_older", disabled=page.before is None):
        st.session_state["audit_cursor"] = (page.before, None)
        st.rerun()

    st.subheader("Chain verification")
    scope = st.radio("Scope", ["the From/To range", "the whole ledger"], key="verify_scope",
                     horizontal=True)
    if st.button("Verify the hash chains", key="verify"):
        whole = scope == "the whole ledger"
        with st.spinner("recomputing hashes …"):
            report = queries.ledger.verify(None if whole else flt.since,
                                           None if whole else flt.until)
        st.session_state["verify_result"] = (datetime.now().isoformat(timespec="seconds"),
                                             scope, report)
    if "verify_result" in st.session_state:
        when, what, report = st.session_state["verify_result"]
        text = f"{what}, checked {when}: {report.reason}"
        if report.ok:
            st.success(f"Chain intact — {text}")
        else:
            st.error(f"Chain BROKEN at {report.chain} seq {report.first_bad_seq} "
                     f"({plain(report.first_bad_decision_id)}) — {plain(text)}")
    else:
        st.caption("Not verified in this session yet.")

    st.subheader("Export")
    e1, e2, e3 = st.columns([1, 1, 2])
    fmt = e1.selectbox("Format", ["csv", "jsonl", "parquet", "html"], key="export_format")
    reveal = e2.checkbox("Raw card/terminal ids", key="export_reveal",
                         help="Default: keyed pseudonyms ($FINSENTINEL_PSEUDONYM_KEY).")
    if e3.button("Prepare export of the search", key="export"):
        _prepare_export(queries, flt, fmt, reveal)
    ready = st.session_state.get("export_ready")
    if ready and ready.get("made_for") != (flt, fmt, bool(reveal)):
        # Prepared for another search, format or id choice: offering it under the new
        # filters would hand over other decisions (or raw ids) than the screen says.
        del st.session_state["export_ready"]
        ready = None
    if ready:
        st.download_button(f"Download {ready['name']} ({ready['rows']:,} decisions)",
                           ready["data"], file_name=ready["name"], mime=ready["mime"],
                           key="export_download", on_click="ignore")


def _prepare_export(queries: DashboardQueries, flt: SearchFilter, fmt: str,
                    reveal: bool) -> None:
    import io

    from pipeline import audit

    count = queries.count(flt)
    limit = EXPORT_MAX_CASES if fmt == "html" else EXPORT_MAX_ROWS
    if count > limit:
        what = "an HTML case report holds" if fmt == "html" else "the dashboard exports"
        st.error(f"{count:,} decisions match; {what} at most {limit:,}: narrow the search, "
                 "or use `finsentinel audit export`.")
        return
    try:
        ids = queries.matching_ids(flt)
        rows = [row for start in range(0, len(ids), 900)
                for row in audit.export_rows(queries.ledger, reveal=reveal,
                                             decision_ids=ids[start:start + 900])]
    except ValueError as exc:  # no pseudonym key configured
        st.error(str(exc))
        return
    name = f"finsentinel-decisions.{fmt}"
    if fmt == "html":
        reviews = audit.reviews_by_decision(queries.ledger, [r["decision_id"] for r in rows])
        data = audit.render_case_report(rows, reviews, pseudonymised=not reveal).encode()
        mime = "text/html"
    else:
        frame = audit.export_frame(rows)
        buffer = io.BytesIO()
        {"csv": frame.write_csv, "jsonl": frame.write_ndjson,
         "parquet": frame.write_parquet}[fmt](buffer)
        data = buffer.getvalue()
        mime = {"csv": "text/csv", "jsonl": "application/x-ndjson",
                "parquet": "application/octet-stream"}[fmt]
    st.session_state["export_ready"] = {"name": name, "data": data, "mime": mime,
                                        "rows": len(rows), "made_for": (flt, fmt, bool(reveal))}


