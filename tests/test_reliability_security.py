"""Security: weights only from safetensors, every artifact file checked against its manifest
before it is read, parameterised SQL only (hostile ids stored verbatim), database passwords never
printed, ids pseudonymised by a keyed HMAC."""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sqlalchemy.engine import make_url

from pipeline import artifacts, jobs, privacy, schema
from pipeline.encoder import TextEncoder, UnsafeModelError, check_safetensors_only
from pipeline.features import compute_features
from pipeline.index import INDEX_FILES, FraudIndex
from pipeline.ledger import DEFAULT_DB_ENV, Ledger
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vectors import VectorConfig

sys.path.insert(0, str(Path(__file__).parent))
from reliability_workers import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("pipeline", "flows") for p in (REPO / d).rglob("*.py"))


# --- model weights: safetensors only ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A randomly initialised one-layer BERT as a sentence-transformers directory, saved with
    safetensors; and copies whose weights are a pickle (alone, or beside the safetensors)."""
    import shutil

    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.encoder import packaged_model_path

    work = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path())  # vocabulary only
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=8,
                                num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, max_position_embeddings=64))
    bert.save_pretrained(work / "bert")
    tokenizer.save_pretrained(work / "bert")
    safe = work / "safe"
    SentenceTransformer(modules=[models.Transformer(str(work / "bert")),
                                 models.Pooling(8)]).save(str(safe))

    only_pickle = work / "only-pickle"
    shutil.copytree(safe, only_pickle)
    (only_pickle / "model.safetensors").unlink()
    torch.save(bert.state_dict(), only_pickle / "pytorch_model.bin")

    both = work / "both"
    shutil.copytree(safe, both)
    marker = work / "pickle-ran"

    class Payload:  # unpickling this would create the marker file: code execution
        def __reduce__(self):
            return (Path.touch, (marker,))

    (both / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    return {"safe": safe, "only-pickle": only_pickle, "both": both, "marker": marker}


def test_safetensors_model_directories_load_and_encode(tiny_models, tmp_path):
    encoder = TextEncoder(tiny_models["safe"], device="cpu", cache_dir=tmp_path)
    vectors = encoder.encode(["card payment", "online shop", "card payment"])
    assert vectors.shape == (3, 8)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])


@pytest.mark.parametrize("which", ["only-pickle", "both"])
def test_pickle_weights_are_refused_before_anything_is_unpickled(tiny_models, tmp_path, which):
    encoder = TextEncoder(tiny_models[which], device="cpu", cache_dir=tmp_path)
    with pytest.raises(UnsafeModelError, match=r"pickle-format weights \(pytorch_model\.bin\)"):
        encoder.encode(["a b c"])
    assert not tiny_models["marker"].exists()


def test_the_cli_refuses_a_pickle_encoder_with_a_message(tiny_models, tmp_path):
    history = tmp_path / "history.parquet"
    generate(SyntheticConfig(n_customers=20, n_terminals=40, n_days=10, seed=1)).write_parquet(
        history)
    code, out, err = run_cli("index", "build", "--input", str(history), "--name", "x",
                             "--root", str(tmp_path / "idx"), "--encoder",
                             str(tiny_models["both"]))
    assert code == 2 and "Traceback" not in out + err
    assert "pickle-format weights" in " ".join(err.split())
    assert not (tmp_path / "idx" / "x" / "CURRENT").exists()
    assert not tiny_models["marker"].exists()


def test_the_packaged_default_encoder_is_safetensors_only():
    from pipeline.encoder import packaged_model_path

    check_safetensors_only(packaged_model_path())  # raises if it ever ships a pickle


def calls_in(path: Path) -> list[tuple[str, ast.Call]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(
                func.value, ast.Name) else ""
            out.append((f"{owner}.{name}" if owner else name, node))
    return out


def test_no_code_path_unpickles():
    """No pickle-based loading anywhere in the library or flows: no pickle/joblib/dill imports,
    no torch.load, no read_pickle, and np.load only with allow_pickle=False."""
    banned_modules = {"pickle", "cPickle", "joblib", "dill", "cloudpickle", "shelve", "marshal"}
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                if any(n.split(".")[0] in banned_modules for n in names):
                    problems.append(f"{path}:{node.lineno} imports {names}")
        for name, call in calls_in(path):
            short = name.split(".")[-1]
            if name == "torch.load" or short in ("read_pickle", "load_pickle"):
                problems.append(f"{path}:{call.lineno} calls {name}")
            if name in ("np.load", "numpy.load"):
                allow = {k.arg: k.value for k in call.keywords}.get("allow_pickle")
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    problems.append(f"{path}:{call.lineno} np.load without allow_pickle=False")
    assert problems == []


def test_sql_is_never_built_from_values():
    """Every SQL statement text is a constant: no f-string, % or .format into execute/text,
    except placeholder lists (``marks``: "?,?,?" built from a count, never from data)."""
    sql_calls = {"text", "execute", "executemany", "executescript", "exec_driver_sql"}
    placeholders = {"marks"}
    problems = []
    for path in SOURCES:
        for name, call in calls_in(path):
            if name.split(".")[-1] not in sql_calls or not call.args:
                continue
            first = call.args[0]
            if isinstance(first, ast.JoinedStr):
                values = [v.value for v in first.values if isinstance(v, ast.FormattedValue)]
                if all(isinstance(v, ast.Name) and v.id in placeholders for v in values):
                    continue
                problems.append(f"{path}:{call.lineno} f-string SQL")
            elif isinstance(first, ast.BinOp) or (
                    isinstance(first, ast.Call) and isinstance(first.func, ast.Attribute)
                    and first.func.attr == "format"):
                problems.append(f"{path}:{call.lineno} SQL built with an operator or .format")
    assert problems == []


# --- artifacts: checked against the manifest before anything is read -------------------------

@pytest.fixture(scope="module")
def built_index(tmp_path_factory):
    data = compute_features(generate(SyntheticConfig(n_customers=60, n_terminals=120,
                                                     n_days=12, seed=4)))
    index = FraudIndex.build(data, encoder=None, vector_config=VectorConfig(text_dim=0))
    return index


@pytest.mark.parametrize("name", INDEX_FILES)
def test_a_tampered_index_file_is_refused_before_any_file_is_read(built_index, tmp_path,
                                                                  monkeypatch, name):
    import faiss

    built_index.save("cards", tmp_path)
    directory, _ = artifacts.resolve(tmp_path, "cards")
    target = directory / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    target.write_bytes(bytes(data))

    opened = []
    for module, attr in ((faiss, "read_index"), (pl, "read_parquet"), (np, "load")):
        real = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda *a, _r=real, _n=attr, **k: (
            opened.append(_n), _r(*a, **k))[1])
    with pytest.raises(artifacts.ArtifactError, match=rf"{name}: sha256 .* does not match"):
        FraudIndex.load("cards", tmp_path)
    assert opened == []


def test_a_manifest_that_does_not_list_a_loaded_file_is_refused(built_index, tmp_path):
    built_index.save("cards", tmp_path)
    directory, manifest = artifacts.resolve(tmp_path, "cards")
    del manifest["files"]["index.faiss"]  # as if an unchecked file were slipped in
    (directory / artifacts.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(artifacts.ArtifactError, match="index.faiss not listed in the manifest"):
        FraudIndex.load("cards", tmp_path)


# --- SQL injection strings end to end ---------------------------------------------------------

HOSTILE = ["'; DROP TABLE decisions; --", "x'); DELETE FROM batches; --", "1 OR 1=1",
           "$1", "%s", "?", "\\'\\\"", "ünï-cødé-😀", "a\tb", "Robert'); DROP TABLE quarantine;--"]


def test_hostile_ids_and_text_are_stored_verbatim(db_url, built_index, tmp_path):
    built_index.save("cards", tmp_path / "idx")
    index = FraudIndex.load("cards", tmp_path / "idx")
    base = built_index.meta.sort(schema.TX_TIME).tail(len(HOSTILE))
    rows = base.select(schema.TX_TIME, schema.CUSTOMER_ID, schema.TERMINAL_ID).with_columns(
        pl.Series(schema.TRANSACTION_ID, HOSTILE),
        pl.Series(schema.AMOUNT, [12.5] * len(HOSTILE)),
        pl.Series(schema.MERCHANT_NAME, list(reversed(HOSTILE))),
    )
    bad = rows.head(1).with_columns(pl.lit("'; DROP TABLE batches; --bad").alias(
        schema.TRANSACTION_ID), pl.lit(-1.0).alias(schema.AMOUNT))
    feed = pl.concat([rows, bad]).with_columns(pl.col(schema.TX_TIME).dt.to_string(
        "%Y-%m-%dT%H:%M:%S"))
    feed.write_csv(tmp_path / "hostile.csv")
    with Ledger(db_url) as ledger:
        report = jobs.score_file(tmp_path / "hostile.csv", index, tmp_path / "s.parquet",
                                 ledger=ledger, batch_id="'; DROP TABLE ledger_meta; --")
        assert report.rows_scored == len(HOSTILE) and report.rows_quarantined == 1
        decisions = ledger.decisions()
        held = ledger.quarantined()
        assert sorted(d["subject_id"] for d in decisions) == sorted(HOSTILE)
        assert {d["batch_id"] for d in decisions} == {"'; DROP TABLE ledger_meta; --"}
        assert json.loads(held[0]["raw"])[schema.TRANSACTION_ID] == "'; DROP TABLE batches; --bad"
        assert ledger.verify().ok
        again = jobs.score_file(tmp_path / "hostile.csv", index, tmp_path / "s.parquet",
                                ledger=ledger, batch_id="'; DROP TABLE ledger_meta; --")
        assert again.ledger_added == 0 and ledger.count() == len(HOSTILE)


# --- secrets ----------------------------------------------------------------------------------

def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != DEFAULT_DB_ENV}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env={**base, **(env or {})}, timeout=300)


def with_password(url: str, password: str) -> str:
    """The test server trusts local connections, so any password is accepted: a canary."""
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def test_a_database_password_is_never_printed(pg_url, built_index, tmp_path):
    canary = "Canary-pw-4Xq"
    good = with_password(pg_url, canary)
    unreachable = make_url(good).set(port=1).render_as_string(hide_password=False)
    unparseable = f"postgresql://postgres:{canary}@127.0.0.1:notaport/test"

    built_index.save("cards", tmp_path / "idx")
    feed = built_index.meta.head(30).drop(schema.IS_FRAUD, "label_time").with_columns(
        pl.col(schema.TX_TIME).dt.to_string("%Y-%m-%dT%H:%M:%S"))
    feed.write_csv(tmp_path / "feed.csv")
    printed = []
    code, out, err = run_cli("score", "--input", str(tmp_path / "feed.csv"), "--index", "cards",
                             "--root", str(tmp_path / "idx"), "--output", str(tmp_path / "s.csv"),
                             env={DEFAULT_DB_ENV: good})
    assert code == 0, err
    printed.append(out + err)
    code, out, err = run_cli("audit", "verify", "--db", good)
    assert code == 0 and "chain intact" in out
    printed.append(out + err)
    no_password = make_url(unreachable).set(password=None).render_as_string()
    for env, args in (({DEFAULT_DB_ENV: unreachable}, ()), ({}, ("--db", unreachable)),
                      ({}, ("--db", unparseable)), ({"PGPASSWORD": canary}, ("--db", no_password))):
        code, out, err = run_cli("audit", "verify", *args, env=env)
        assert code == 2 and err.lstrip().startswith("error:") and "Traceback" not in err, err
        printed.append(out + err)
    # Once as a real process, as a user runs it: the console script's own output.
    real = cli("audit", "verify", env={DEFAULT_DB_ENV: unreachable})
    assert real.returncode == 2 and "Traceback" not in real.stderr
    assert "ledger database error" in real.stderr and "***" not in real.stdout
    printed.append(real.stdout + real.stderr)
    for text in printed:
        assert canary not in text
    assert canary not in (tmp_path / "s.csv").read_text()
    for path in (tmp_path / "idx").rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes()
    with Ledger(good) as ledger:
        assert canary not in repr(ledger) and ledger.count() == 30


# --- pseudonyms -------------------------------------------------------------------------------

def reference(key: bytes, value: str) -> str:
    return "p_" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]


K1 = b"k1-0123456789abcdef"  # keys of 16+ characters: shorter ones are not used


def test_pseudonyms_are_a_keyed_hmac_from_the_environment(monkeypatch):
    monkeypatch.setenv(privacy.PSEUDONYM_KEY_ENV, K1.decode())
    assert privacy.pseudonymise("cust-42") == reference(K1, "cust-42")
    assert privacy.pseudonymise(42) == privacy.pseudonymise("42")
    assert privacy.pseudonymise(None) is None
    frame = pl.DataFrame({"customer_id": ["a", "b", None], "amount": [1.0, 2.0, 3.0]})
    out = privacy.pseudonymise_column(frame, ["customer_id", "absent"])
    assert out["customer_id"].to_list() == [reference(K1, "a"), reference(K1, "b"), None]
    assert out["amount"].to_list() == [1.0, 2.0, 3.0]
    records = privacy.pseudonymise_records([{"customer_id": "a", "score": 0.9}], ["customer_id"])
    assert records == [{"customer_id": reference(K1, "a"), "score": 0.9}]
    monkeypatch.setenv(privacy.PSEUDONYM_KEY_ENV, "k2-0123456789abcdef")
    assert privacy.pseudonymise("cust-42") != reference(K1, "cust-42")


def test_without_a_key_pseudonyms_use_a_process_key_and_say_so(monkeypatch):
    monkeypatch.delenv(privacy.PSEUDONYM_KEY_ENV, raising=False)
    monkeypatch.setattr(privacy, "_process_key", None)
    with pytest.raises(ValueError, match=privacy.PSEUDONYM_KEY_ENV):
        privacy.pseudonym_key(required=True)
    with pytest.warns(privacy.PseudonymKeyWarning):
        first = privacy.pseudonymise("cust-42")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not per id
        assert privacy.pseudonymise("cust-42") == first
    assert first != reference(b"", "cust-42") and len(first) == 18


def test_a_short_pseudonym_key_is_refused_not_used(monkeypatch):
    """A key of a few characters is found by trying short keys against one known id, and then
    every pseudonym made with it is reversible: it is treated as no key (and said so)."""
    monkeypatch.setenv(privacy.PSEUDONYM_KEY_ENV, "k1")
    monkeypatch.setattr(privacy, "_process_key", None)
    with pytest.raises(ValueError, match="shorter than 16 characters"):
        privacy.pseudonym_key(required=True)
    with pytest.warns(privacy.PseudonymKeyWarning, match="shorter than 16 characters"):
        shown = privacy.pseudonymise("cust-42")
    assert shown != reference(b"k1", "cust-42")
    monkeypatch.setenv(privacy.PSEUDONYM_KEY_ENV, "k" * 16)
    assert privacy.pseudonymise("cust-42") == reference(b"k" * 16, "cust-42")


def test_one_id_column_named_as_a_string_is_pseudonymised(monkeypatch):
    """A single name given as a string used to be read as its letters: no column matched, and
    the raw ids went out as they were."""
    monkeypatch.setenv(privacy.PSEUDONYM_KEY_ENV, K1.decode())
    frame = privacy.pseudonymise_column(pl.DataFrame({"customer_id": ["c1"]}), "customer_id")
    assert frame["customer_id"].to_list() == [reference(K1, "c1")]
    records = privacy.pseudonymise_records([{"customer_id": "c1"}], "customer_id")
    assert records == [{"customer_id": reference(K1, "c1")}]


def test_pseudonyms_do_not_depend_on_the_ids_type(monkeypatch):
    """The same id read as a string, an int, a numpy scalar, bytes or an integral float (an int
    column with gaps, as pandas reads it) gets the same pseudonym."""
    key = b"0123456789abcdef"
    same = {privacy.pseudonymise(v, key=key)
            for v in ("7", 7, np.int64(7), b"7", 7.0, np.float64(7.0), np.str_("7"))}
    assert same == {reference(key, "7")}
    assert privacy.pseudonymise(7.5, key=key) == reference(key, "7.5")
    monkeypatch.setenv(privacy.PSEUDONYM_KEY_ENV, key.decode())
    floats = privacy.pseudonymise_column(pl.DataFrame({"customer_id": [7.0, None]}),
                                         ["customer_id"])
    assert floats["customer_id"].to_list() == [reference(key, "7"), None]


def test_urls_and_messages_are_redacted():
    assert privacy.redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert privacy.redact_url("sqlite:////tmp/l.sqlite") == "sqlite:////tmp/l.sqlite"
    assert privacy.url_password("postgresql://u:p%40ss@h/db") == "p@ss"
    assert privacy.url_password("postgresql://u:pw@h:bad/db") == "pw"  # unparseable port
    assert privacy.redact("failed for u:p%40ss@h and p@ss", ["p@ss"]) == \
        "failed for u:***@h and ***"
    assert privacy.flow_db_url(None) is None
    assert privacy.flow_db_url("sqlite:///x.sqlite") == "sqlite:///x.sqlite"
    from pydantic import SecretStr

    assert privacy.flow_db_url(SecretStr("postgresql://u:pw@h/db")) == "postgresql://u:pw@h/db"
    with pytest.raises(ValueError, match="SecretStr") as refused:
        privacy.flow_db_url("postgresql://u:pw-canary@h/db")
    assert "pw-canary" not in str(refused.value)


def test_a_password_in_the_url_query_is_a_password_too():
    """libpq and SQLAlchemy take ``?password=`` (and ``sslpassword=``) as the password: it was
    shown as it is by redact_url and let through by flow_db_url into Prefect's parameters."""
    for key in ("password", "sslpassword"):
        url = f"postgresql://u@h:5432/db?sslmode=require&{key}=Canary-q%401"
        assert privacy.url_password(url) == "Canary-q@1"
        assert privacy.redact_url(url) == f"postgresql://u@h:5432/db?sslmode=require&{key}=***"
        with pytest.raises(ValueError, match="SecretStr") as refused:
            privacy.flow_db_url(url)
        assert "Canary" not in str(refused.value)
    both = "postgresql://u:pw1@h/db?password=Canary-q2"
    assert "Canary" not in privacy.redact_url(both) and "pw1" not in privacy.redact_url(both)
    secret = privacy.url_password("postgresql://h/d?password=Canary-q2")
    assert privacy.redact("login Canary-q2 refused", [secret]) == "login *** refused"


def test_an_at_sign_left_unencoded_in_a_password_is_not_shown_in_part():
    """``u:Canary1@Canary2@host``: SQLAlchemy (and the driver) end the password at the first
    ``@`` and take ``Canary2@host`` as the host, so the second half of the password went out in
    redacted URLs and in the driver's could-not-resolve message."""
    url = "postgresql://u:Canary1@Canary2@127.0.0.1:1/db"
    assert privacy.url_password(url) == "Canary1@Canary2"
    assert privacy.redact_url(url) == "postgresql://u:***@127.0.0.1:1/db"
    assert "Canary" not in privacy.redact_url("postgresql://u:Canary1@Canary2@h:bad/db")
    code, out, err = run_cli("audit", "verify", "--db", url)
    assert code == 2 and err.lstrip().startswith("error:") and "Traceback" not in err, err
    assert "Canary" not in out + err


def test_a_ledger_on_a_url_with_a_query_password_shows_none(pg_url):
    """The PostgreSQL server trusts local connections: any password connects (a canary)."""
    url = make_url(pg_url).update_query_dict({"password": "Canary-q3"}).render_as_string(
        hide_password=False)
    with Ledger(url) as ledger:
        assert ledger.count() == 0
        assert "Canary" not in repr(ledger) and "password=***" in repr(ledger)


def test_a_query_password_in_a_db_argument_is_not_printed():
    """``--db URL`` as its own argument: the CLI's redaction used to look only at the text
    after the argument's first ``=``, which for ``…?password=X`` is X alone, not a URL."""
    for url in ("postgresql://u@127.0.0.1:notaport/db?password=Canary-q5",
                "postgresql://u@127.0.0.1:1/db?sslmode=disable&password=Canary-q5"):
        for args in (("--db", url), (f"--db={url}",)):
            code, out, err = run_cli("audit", "verify", *args)
            assert code == 2 and err.lstrip().startswith("error:") and "Traceback" not in err
            assert "Canary" not in out + err, err
