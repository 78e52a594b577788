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

import numpy as np
import polars as pl
from sqlalchemy.engine import make_url
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

def url_password(url: str | None) -> str | None:
    """The password in a database URL, if it has one (None for SQLite paths and bad URLs)."""
    if not url:
        return None
    try:
        return make_url(url).password or None
    except (ArgumentError, ValueError):  # unparseable, yet it may still carry user:password@
        found = re.match(r"^[\w+.-]+://[^:/@]*:([^@]*)@", url)
        return found.group(1) if found and found.group(1) else None


def redact_url(url: str | None) -> str:
    """The URL as it may be shown: its password, if any, replaced by ``***``."""
    if not url:
        return ""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return redact(url, [url_password(url)])
    if parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)


def redact(text: str, secrets_: Iterable[str | None]) -> str:
    """``text`` with every occurrence of each secret (and its URL-quoted form) replaced."""
    from urllib.parse import quote, quote_plus

    for secret in secrets_:
        if not secret:
            continue
        for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
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
