"""The CLI as a new user meets it through README.md and docs/operations.md: documented options
exist, typical mistakes (a missing or read-only folder, a directory instead of a file, a wrong
suffix, an unknown index, a ledger that does not exist, a database URL of another kind) stop
with exit code 2 and a message naming the option, the path and what was expected, without a
traceback and before any long work starts."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.ledger import DEFAULT_DB_ENV, Ledger
from pipeline.settings import WORKDIR_ENV
from pipeline.synthetic import SyntheticConfig, write_parquet

sys.path.insert(0, str(Path(__file__).parent))
from reliability_workers import run_cli  # noqa: E402
from test_audit import flat, small_decisions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No ledger or index from the environment: the defaults fall under tmp_path/work."""
    monkeypatch.delenv(DEFAULT_DB_ENV, raising=False)
    monkeypatch.setenv(WORKDIR_ENV, str(tmp_path / "work"))
    monkeypatch.setenv("FINSENTINEL_INDEXES", str(tmp_path / "indexes"))
    monkeypatch.setenv("FINSENTINEL_PSEUDONYM_KEY", KEY)


@pytest.fixture(scope="module")
def tx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tx.parquet"
    write_parquet(SyntheticConfig(n_customers=50, n_terminals=100, n_days=30, seed=3), path)
    return path


@pytest.fixture
def ledger_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    with Ledger(url) as ledger:
        ledger.record_batch("a", "fraud", "in-a", 3, small_decisions("a", 3))
    return url


def refused(code: int, out: str, err: str, *expected: str) -> str:
    """Exit 2, one 'error:' message holding every expected piece, no traceback."""
    text = flat(out + err)
    assert code == 2, text
    assert "error:" in text and "Traceback" not in text, text
    for piece in expected:
        assert piece in text, (piece, text)
    return text


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder nobody may create files in: chmod for a user, /sys for root."""
    if os.geteuid() == 0:
        if not Path("/sys").is_dir():
            pytest.skip("running as root without /sys: no folder root cannot write")
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


# --- outputs ----------------------------------------------------------------------------------

def test_an_output_that_is_a_directory_is_refused_before_any_work(tmp_path, tx, ledger_url):
    folder = tmp_path / "out"
    folder.mkdir()
    for args in (["generate", "--output", str(folder), "--days", "2"],
                 ["features", "--input", str(tx), "--output", str(folder)],
                 ["score", "--input", str(tx), "--index", "fraud", "--output", str(folder)],
                 ["evaluate", "--data", str(tx), "--test-start", "2018-04-22", "--folds", "1",
                  "--scorer", "logreg", "--output", str(folder)],
                 ["audit", "anchor", "--out", str(folder), "--db", ledger_url],
                 ["audit", "export", "--format", "csv", "--out", str(folder), "--db",
                  ledger_url]):
        text = refused(*run_cli(*args), f"{folder} is a directory")
        assert ".tmp" not in text and "fold 0" not in text, text  # no temp name, no work done


def test_an_output_with_the_wrong_suffix_is_refused(tmp_path, tx, ledger_url):
    text = refused(*run_cli("generate", "--output", str(tmp_path / "tx.csv"), "--days", "2"),
                   "--output", "tx.csv", ".parquet")
    assert not (tmp_path / "tx.csv").exists(), text
    refused(*run_cli("evaluate", "--data", str(tx), "--test-start", "2018-04-22", "--folds",
                     "1", "--scorer", "logreg", "--output", str(tmp_path / "report.csv")),
            "--output", "report.csv", ".json")
    refused(*run_cli("audit", "export", "--format", "csv", "--out", str(tmp_path / "x.parquet"),
                     "--db", ledger_url), "--out", "x.parquet", ".csv", "--format csv")
    assert not (tmp_path / "x.parquet").exists()
    code, out, err = run_cli("audit", "export", "--format", "html", "--out",
                             str(tmp_path / "case.html"), "--db", ledger_url)
    assert code == 0, err


def test_generate_creates_a_missing_output_folder_as_the_other_commands_do(tmp_path, tx):
    target = tmp_path / "new" / "sub" / "tx.parquet"
    code, out, err = run_cli("generate", "--output", str(target), "--customers", "20",
                             "--terminals", "20", "--days", "2")
    assert code == 0, err
    assert target.is_file() and f"to {target}" in flat(out)
    features = tmp_path / "other" / "f.parquet"
    code, _, err = run_cli("features", "--input", str(tx), "--output", str(features))
    assert code == 0 and features.is_file(), err


def test_a_read_only_output_folder_is_named(tmp_path, tx, ledger_url):
    folder = unwritable_folder(tmp_path)
    for args in (["generate", "--output", str(folder / "tx.parquet"), "--days", "2"],
                 ["features", "--input", str(tx), "--output", str(folder / "f.parquet")],
                 ["evaluate", "--data", str(tx), "--test-start", "2018-04-22", "--folds", "1",
                  "--scorer", "logreg", "--output", str(folder / "r.json")],
                 ["audit", "anchor", "--out", str(folder / "a.json"), "--db", ledger_url]):
        text = refused(*run_cli(*args), f"cannot write in folder {folder}")
        assert ".tmp" not in text and "fold 0" not in text, text


# --- inputs -----------------------------------------------------------------------------------

def test_an_input_that_is_a_directory_is_named_as_such(tmp_path):
    for args in (["features", "--input", str(tmp_path), "--output", str(tmp_path / "f.parquet")],
                 ["index", "build", "--input", str(tmp_path), "--name", "fraud"],
                 ["score", "--input", str(tmp_path), "--index", "fraud", "--output",
                  str(tmp_path / "s.parquet")],
                 ["evaluate", "--data", str(tmp_path), "--test-start", "2018-04-22",
                  "--output", str(tmp_path / "r.json")],
                 ["sentiment", "classify", "--input", str(tmp_path), "--model", "m",
                  "--output", str(tmp_path / "n.jsonl")]):
        refused(*run_cli(*args), f"{tmp_path} is a directory", "expected a file")


def test_anchor_file_errors_name_the_file(tmp_path, tx, ledger_url):
    refused(*run_cli("audit", "verify", "--db", ledger_url, "--anchors",
                     str(tmp_path / "missing.json")), "--anchors", "missing.json", "no such file")
    refused(*run_cli("audit", "verify", "--db", ledger_url, "--anchors", str(tx)),
            "--anchors", str(tx), "not an anchor file")


# --- indexes ----------------------------------------------------------------------------------

def test_an_index_name_cannot_leave_the_index_root(tmp_path, tx):
    root = tmp_path / "deep" / "indexes"
    text = refused(*run_cli("index", "build", "--input", str(tx), "--name", "../../escaped",
                            "--root", str(root), "--text-dim", "0"), "--name", "../../escaped")
    assert "rows in" not in text  # refused before reading the history
    assert not (tmp_path / "escaped").exists()


def test_partitioned_scoring_checks_the_index_and_output_before_a_cluster_starts(tmp_path, tx):
    text = refused(*run_cli("score", "--input", str(tx), "--index", "nosuch", "--output",
                            str(tmp_path / "p.parquet"), "--partitions", "2"), "nosuch")
    assert "Flow run" not in text
    text = refused(*run_cli("score", "--input", str(tx), "--index", "nosuch", "--output",
                            str(tmp_path / "p.txt"), "--partitions", "2"), "p.txt", ".parquet")
    assert not (tmp_path / "p.txt.parts").exists()


# --- the ledger -------------------------------------------------------------------------------

def test_audit_commands_refuse_a_ledger_that_does_not_exist(tmp_path):
    missing = tmp_path / "typo" / "ledger.sqlite"
    url = f"sqlite:///{missing}"
    for args in (["audit", "verify"], ["audit", "anchor", "--out", str(tmp_path / "a.json")],
                 ["audit", "export", "--format", "csv", "--out", str(tmp_path / "x.csv")],
                 ["audit", "replay", "some-id"],
                 ["audit", "review", "some-id", "--label", "confirmed-fraud"]):
        refused(*run_cli(*args, "--db", url), "no ledger", str(missing))
        assert not missing.exists() and not missing.parent.exists()
    # The default ledger ($FINSENTINEL_WORKDIR/ledger.sqlite) too: no "ledger OK: 0 records".
    default = tmp_path / "work" / "ledger.sqlite"
    refused(*run_cli("audit", "verify"), "no ledger", str(default))
    assert not default.exists()
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "x.csv").exists()


def test_index_build_with_a_ledger_that_does_not_exist_creates_none(tmp_path, tx):
    missing = tmp_path / "typo" / "ledger.sqlite"
    code, out, err = run_cli("index", "build", "--input", str(tx), "--name", "fraud",
                             "--text-dim", "0", "--db", f"sqlite:///{missing}")
    assert code == 0, err
    assert "no analyst reviews applied" in flat(err) and str(missing) in flat(err)
    assert not missing.exists() and not missing.parent.exists()


def test_a_sqlite_ledger_that_cannot_be_written_is_named(tmp_path, tx, read_only):
    """Not SQLite's bare "unable to open database file": the file, and what is wrong with
    it. As root (chmod does not stop root) the folder and file are made immutable instead
    (chattr +i; skipped where that is not allowed); a path under a regular file needs
    neither."""
    from pipeline import jobs
    from pipeline.ingest import read_transactions
    from pipeline.vectors import VectorConfig

    jobs.build_index(read_transactions(tx, require_labels=True), "fraud",
                     root=tmp_path / "indexes", encoder=None,
                     vector_config=VectorConfig(text_dim=0))
    score = ["score", "--input", str(tx), "--index", "fraud", "--output",
             str(tmp_path / "s.parquet"), "--db"]
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    refused(*run_cli(*score, f"sqlite:///{blocker / 'ledger.sqlite'}"),
            str(blocker / "ledger.sqlite"), f"{blocker} is a file, not a folder")

    existing = tmp_path / "kept" / "ledger.sqlite"
    with Ledger(f"sqlite:///{existing}") as ledger:
        ledger.record_batch("a", "fraud", "in-a", 3, small_decisions("a", 3))
        decision_id = ledger.decisions()[0]["decision_id"]
    read_only(existing)
    for args in (score + [f"sqlite:///{existing}"],
                 ["audit", "review", decision_id, "--label", "false-positive", "--db",
                  f"sqlite:///{existing}"]):
        refused(*run_cli(*args), str(existing), "the file is read-only")
    code, out, err = run_cli("audit", "verify", "--db", f"sqlite:///{existing}")
    assert code == 0, err  # reading a read-only ledger still works

    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(folder)
    refused(*run_cli(*score, f"sqlite:///{folder / 'ledger.sqlite'}"),
            str(folder / "ledger.sqlite"), f"folder {folder} is not writable")
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.parametrize("where", ["option", "environment"])
def test_a_database_url_of_another_kind_is_refused_without_a_traceback(tmp_path, tx, where):
    url = "mysql://fs:Canary-pw-71@db/fs"
    args, env = (["--db", url], {}) if where == "option" else ([], {DEFAULT_DB_ENV: url})
    for command in (["audit", "verify"],
                    ["score", "--input", str(tx), "--index", "fraud", "--output",
                     str(tmp_path / "s.parquet")],
                    ["sentiment", "classify", "--input", str(tx), "--model", "m", "--output",
                     str(tmp_path / "n.jsonl")]):
        text = refused(*run_cli(*command, *args, env=env), "sqlite:///", "postgresql://",
                       "'mysql'")
        assert "Canary-pw-71" not in text


# --- option names in messages -----------------------------------------------------------------

def test_value_errors_name_the_option(tmp_path, tx):
    out = str(tmp_path / "s.parquet")
    refused(*run_cli("score", "--input", str(tx), "--index", "fraud", "--output", out,
                     "--alerts-per-day", "0"), "--alerts-per-day", ">= 1")
    report = str(tmp_path / "r.json")
    base = ["evaluate", "--data", str(tx), "--output", report, "--scorer", "logreg"]
    refused(*run_cli(*base, "--test-start", "22/04/2018"), "--test-start", "'22/04/2018'")
    refused(*run_cli(*base, "--test-start", "2018-04-22", "--folds", "0"), "--folds", ">= 1")
    refused(*run_cli(*base, "--test-start", "2018-04-22", "--top-k", "0"), "--top-k", ">= 1")
    target = str(tmp_path / "g.parquet")
    refused(*run_cli("generate", "--output", target, "--days", "0"), "--days", ">= 1")
    refused(*run_cli("generate", "--output", target, "--customers", "-1"), "--customers")
    refused(*run_cli("generate", "--output", target, "--start", "2018-13-01"), "--start",
            "'2018-13-01'")


# --- help and docs ----------------------------------------------------------------------------

def _help(*command: str) -> str:
    from pipeline.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return flat(result.output)


def test_every_option_in_the_readme_commands_table_exists():
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `finsentinel ([^`]*)`", table, flags=re.M)
    assert len(rows) >= 15
    for row in rows:
        words = row.replace("\\|", "|").split()
        command = []
        for word in words:
            if word.startswith(("-", "[", "...", "ID")) or not word.islower():
                break
            command.append(word)
        text = _help(*command)
        for option in re.findall(r"--[a-z][a-z0-9-]*", row):
            assert option in text, (command, option)


def test_score_help_says_what_partitioned_batches_and_the_threshold_default_are():
    text = _help("score")
    assert "one ledger batch per day" in text and "per partition" not in text
    assert re.search(r"--threshold.*default 0\.5", text)


def test_sentiment_messages_stay_on_one_line():
    from rich.console import Console

    from pipeline.sentiment import cli as sentiment_cli

    long = "model tiny@20261124T122846710688Z in models/tiny/v (9 s); " + "x" * 120
    for console in (sentiment_cli.out, sentiment_cli.console):
        written = io.StringIO()
        Console(width=80, soft_wrap=console.soft_wrap, file=written).print(long, markup=False)
        assert written.getvalue() == long + "\n"


def test_serve_refuses_a_bad_job_setting_before_it_starts(monkeypatch):
    """The scheduled runs read these at run time: serve used to start on a bad value, and
    every run of the hourly, 15-minute and daily jobs then failed in the background."""
    import prefect

    served = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **_: served.append(deployments))
    for name, value in (("FINSENTINEL_INBOX_SETTLE_SECONDS", "soon"),
                        ("FINSENTINEL_INBOX_SETTLE_SECONDS", "-5"),
                        ("FINSENTINEL_KEEP_INDEX_VERSIONS", "ten"),
                        ("FINSENTINEL_DB", "ledger.sqlite")):
        text = refused(*run_cli("serve", "--only", "score-hourly", env={name: value}),
                       f"${name}", repr(value))
        assert "finsentinel schedules" not in text  # refused before the table, before serving
    assert served == []
    code, out, err = run_cli("serve", "--only", "score-hourly",
                             env={"FINSENTINEL_INBOX_SETTLE_SECONDS": " "})  # blank: unset
    assert code == 0 and len(served) == 1 and len(served[0]) == 1, flat(out + err)


# --- what a new user sees ---------------------------------------------------------------------

def test_index_help_offers_only_the_commands_it_has():
    text = _help("index")
    assert "build" in text and "inspect" not in text, text


def test_index_build_refuses_an_unknown_kind_or_scorer_before_reading_the_history(tmp_path, tx):
    for option, value in (("--kind", "exact"), ("--scorer", "xgboost")):
        text = refused(*run_cli("index", "build", "--input", str(tx), "--name", "fraud",
                                "--text-dim", "0", option, value), option, repr(value))
        assert "rows in" not in text  # refused before the history was read
    assert not (tmp_path / "indexes").exists()


def test_features_says_where_the_quarantined_rows_went(tmp_path, tx):
    import polars as pl

    frame = pl.read_parquet(tx).head(20)
    bad = tmp_path / "bad.csv"
    frame.with_columns(pl.Series("amount", [-1.0, *frame["amount"].to_list()[1:]])
                       ).write_csv(bad)
    code, out, err = run_cli("features", "--input", str(bad), "--output",
                             str(tmp_path / "f.parquet"))
    assert code == 0, err
    text = flat(out + err)
    assert "quarantined 1" in text, text
    assert f"quarantined rows in {tmp_path / 'f.quarantine.parquet'}" in text, text


def test_demo_prints_where_its_files_went_in_full(tmp_path, monkeypatch):
    """Paths longer than a table cell were cut ("…/ledge…") in an 80-column terminal or a log."""
    from pipeline import demo

    work = tmp_path / ("deep-folder-" * 6) / "finsentinel-work" / "demo"
    report = demo.DemoReport(
        transactions=10, history_rows=7, batch_rows_in=6, scored=3, quarantined=3, alerts=1,
        frauds_in_batch=1, frauds_alerted=1, auc_roc=1.0, average_precision=1.0,
        index="demo@v1", index_vectors=7, ledger=f"sqlite:///{work / 'ledger.sqlite'}",
        ledger_records=3, ledger_verified=True, scores_file=str(work / "scores.parquet"),
        quarantine_file=str(work / "scores.quarantine.parquet"), seconds=1.0)
    monkeypatch.setattr(demo, "run_demo", lambda config, log: report)
    code, out, err = run_cli("demo", "--workdir", str(work))
    assert code == 0, err
    for path in (str(work), report.ledger, report.scores_file, report.quarantine_file):
        assert path in out, (path, out)
    assert "…" not in out, out


def test_hash_password_names_the_user_option_for_a_bad_name(monkeypatch):
    """Not "$FINSENTINEL_DASHBOARD_USERS entry 1 ('bad')": the user set no variable, and a
    prompt for a password must not come before the name is refused."""
    for name in ("bad:name", "al ice", " "):
        monkeypatch.setattr(sys, "stdin", io.StringIO("long-enough-password\n"))
        text = refused(*run_cli("dashboard", "hash-password", "--user", name), "--user",
                       repr(name))
        assert "FINSENTINEL_DASHBOARD_USERS" not in text.split("error:", 1)[1], text
    monkeypatch.setattr(sys, "stdin", io.StringIO("long-enough-password\n"))
    code, out, err = run_cli("dashboard", "hash-password", "--user", "alice")
    assert code == 0 and out.startswith("alice:scrypt$"), err


def test_index_build_prints_each_step_as_it_starts(tmp_path, tx):
    code, out, err = run_cli("index", "build", "--input", str(tx), "--name", "fraud",
                             "--root", str(tmp_path / "idx"), "--text-dim", "0")
    assert code == 0, err
    steps = [m.group(1).strip() for m in re.finditer(r"(?m)^\s*\d+\.\d s  (.+)$", err + out)]
    import polars as pl

    rows = pl.read_parquet(tx).height
    assert steps[0] == f"features of {rows:,} transactions"
    assert steps[1:] == ["text embeddings, vectors and the FAISS index", "saving"]
