"""What may leave the process: pseudonyms instead of customer and transaction ids, and
database URLs and messages with their passwords taken out.

Pseudonyms are a keyed HMAC-SHA256 of the id, so they are stable (the same id gives the same
pseudonym in every log of every run that shares the key) but cannot be reversed or recomputed
without the key. The key comes from ``$FINSENTINEL_PSEUDONYM_KEY`` only, at least 16 characters;
without it, or with a shorter one, a random per-process key is used (pseudonyms then match
within one process only) and a warning says so.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import warnings
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote_plus

import numpy as np
import polars as pl
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

PSEUDONYM_KEY_ENV = "FINSENTINEL_PSEUDONYM_KEY"
PSEUDONYM_CHARS = 16  # 64 bits of HMAC: collisions negligible for any realistic id count
# A shorter key can be recovered by trying keys against one known id (as audit exports require).
PSEUDONYM_MIN_KEY_CHARS = 16
REDACTED = "***"

_process_key: bytes | None = None


class PseudonymKeyWarning(UserWarning):
    """No pseudonym key is configured: pseudonyms are only consistent within this process."""


def pseudonym_key(*, required: bool = False) -> bytes:
    """The HMAC key from ``$FINSENTINEL_PSEUDONYM_KEY``; with ``required``, a missing or short
    key is an error (exports meant to be joined across runs need a stable key). Without
    ``required``, a short key is not used (a key of a few characters is found by trying short
    keys against one known id, and then every pseudonym is reversible): the random process key
    is, with a warning, as when none is set."""
    global _process_key
    configured = os.environ.get(PSEUDONYM_KEY_ENV, "")
    if len(configured) >= PSEUDONYM_MIN_KEY_CHARS:
        return configured.encode("utf-8")
    problem = ("is not set" if not configured
               else f"is shorter than {PSEUDONYM_MIN_KEY_CHARS} characters")
    if required:
        raise ValueError(f"${PSEUDONYM_KEY_ENV} {problem}: a secret key of at least "
                         f"{PSEUDONYM_MIN_KEY_CHARS} characters is needed for pseudonyms that "
                         "stay the same across runs")
    if _process_key is None:
        _process_key = secrets.token_bytes(32)
        warnings.warn(f"${PSEUDONYM_KEY_ENV} {problem}: pseudonyms in this process use a "
                      "random key and will not match other runs' pseudonyms",
                      PseudonymKeyWarning, stacklevel=3)
    return _process_key


def _id_text(value: object) -> str:
    """The text of an id, whatever type it was read as: 7, "7", numpy's 7, b"7" and an integral
    float 7.0 (an int column with gaps, as pandas reads it) are all "7"."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="surrogateescape")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def pseudonymise(value: object, *, key: bytes | None = None, prefix: str = "p_") -> str | None:
    """``prefix`` + the first 16 hex digits of HMAC-SHA256(key, the id's text); None stays
    None."""
    if value is None:
        return None
    key = key if key is not None else pseudonym_key()
    text = _id_text(value).encode("utf-8", errors="surrogateescape")
    digest = hmac.new(key, text, hashlib.sha256).hexdigest()
    return prefix + digest[:PSEUDONYM_CHARS]


def _names(names: Iterable[str] | str) -> tuple[str, ...]:
    """Field names: a string is one name, not its letters (which would match nothing, and the
    raw ids would go out as they are)."""
    return (names,) if isinstance(names, str) else tuple(names)


def pseudonymise_column(frame: pl.DataFrame, columns: Iterable[str] | str, *,
                        key: bytes | None = None) -> pl.DataFrame:
    """``frame`` with the named id columns (those present) replaced by their pseudonyms; one
    name may be given as a string."""
    present = [c for c in _names(columns) if c in frame.columns]
    if not present:
        return frame
    key = key if key is not None else pseudonym_key()
    return frame.with_columns(
        pl.Series(c, [pseudonymise(v, key=key) for v in frame[c].to_list()], dtype=pl.String)
        for c in present
    )


def pseudonymise_records(records: list[dict], fields: Iterable[str] | str, *,
                         key: bytes | None = None) -> list[dict]:
    """Copies of ``records`` (dicts) with the named id fields pseudonymised; one name may be
    given as a string."""
    fields = _names(fields)
    if not records:
        return []
    key = key if key is not None else pseudonym_key()
    return [{k: pseudonymise(v, key=key) if k in fields else v for k, v in r.items()}
            for r in records]


# --- secrets --------------------------------------------------------------------------------

# Query parameters that libpq (and so SQLAlchemy's PostgreSQL drivers) takes as secrets:
# ``postgresql://u@h/db?password=...`` connects as well as ``u:...@h``.
_SECRET_QUERY = re.compile(r"(?i)([?&](?:ssl)?password=)[^&#]*")
# user:password@ of a URL SQLAlchemy cannot parse; the rest of the authority after it.
_USERINFO = re.compile(r"^[\w+.-]+://[^:/@]*:([^@]*)@([^/?#]*)")


def _parsed(url: str) -> URL | None:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def _written_password(password: str | None, host: str | None) -> str | None:
    """The password as written: SQLAlchemy and libpq end it at the first ``@``, so the rest of
    a password with an unencoded ``@`` lands in the host (no host holds an ``@``)."""
    if password is None:
        return None
    if host and "@" in host:
        return f"{password}@{host.rsplit('@', 1)[0]}"
    return password or None


def url_password(url: str | None) -> str | None:
    """The password in a database URL, if it has one (None for SQLite paths): the one before
    the host (all of it, an unencoded ``@`` included), else a ``password``/``sslpassword``
    query parameter."""
    if not url:
        return None
    parsed = _parsed(url)
    if parsed is not None:
        found = _written_password(parsed.password, parsed.host)
        if found:
            return found
        for key in ("password", "sslpassword"):
            value = parsed.query.get(key)
            value = value[0] if isinstance(value, tuple) and value else value
            if value:
                return str(value)
        return None
    # Unparseable (a bad port, say), yet it may still carry user:password@ or ?password=.
    found = _USERINFO.match(url)
    if found and found.group(1):
        return _written_password(found.group(1), found.group(2))
    query = _SECRET_QUERY.search(url)
    value = unquote_plus(query.group(0)[len(query.group(1)):]) if query else ""
    return value or None


def redact_url(url: str | None) -> str:
    """The URL as it may be shown: its password, if any, replaced by ``***`` (password query
    parameters too)."""
    if not url:
        return ""
    text = _SECRET_QUERY.sub(lambda m: m.group(1) + REDACTED, url)
    parsed = _parsed(text)
    if parsed is None:
        return redact(text, [url_password(url)])
    if _written_password(parsed.password, parsed.host) is None:
        return text
    host = parsed.host.rsplit("@", 1)[-1] if parsed.host else parsed.host
    shown = parsed.set(host=host).render_as_string(hide_password=True)
    return _SECRET_QUERY.sub(lambda m: m.group(1) + REDACTED, shown)


def redact(text: str, secrets_: Iterable[str | None]) -> str:
    """``text`` with every occurrence of each secret (and its URL-quoted form) replaced; a
    secret with an ``@`` in it also piece by piece (a driver that split a URL's password at
    an unencoded ``@`` names the second piece as part of the host)."""
    forms: set[str] = set()
    for secret in secrets_:
        if not secret:
            continue
        for piece in {secret, *(p for p in secret.split("@") if p)}:
            forms |= {piece, quote(piece, safe=""), quote_plus(piece)}
    for form in sorted(forms, key=len, reverse=True):  # a whole secret before its pieces
        text = text.replace(form, REDACTED)
    return text


def flow_db_url(db: object) -> str | None:
    """The ledger URL given to a Prefect flow as ``str | pydantic.SecretStr | None``.

    Prefect stores a flow's parameters as given and shows them in its UI and API, except
    ``SecretStr`` values, which it masks. A password in a plain-string URL parameter is refused:
    give it through the environment (``$FINSENTINEL_DB``, ``$PGPASSWORD``) or as ``SecretStr``.
    """
    if db is None:
        return None
    reveal = getattr(db, "get_secret_value", None)
    if reveal is not None:
        return reveal() or None
    if not isinstance(db, str):
        raise TypeError(f"db must be a URL string or SecretStr, got {type(db).__name__}")
    if url_password(db):
        raise ValueError(
            f"the ledger URL {redact_url(db)} was passed to the flow with its password in plain "
            "text, which Prefect would store with the run's parameters; put the URL in "
            "$FINSENTINEL_DB, the password in $PGPASSWORD, or pass pydantic.SecretStr(url)")
    return db or None
