"""Analysts' sign-in for the dashboard: users and salted scrypt hashes from the environment.

``$FINSENTINEL_DASHBOARD_USERS`` holds ``name:hash`` pairs separated by commas or whitespace;
each hash is what ``finsentinel dashboard hash-password`` prints (``scrypt$N$r$p$salt$key``,
salt and key base64url); a hash whose parameters no check could afford (or compute) is
refused when the users are read, not at each sign-in. No password is ever stored or logged in
plain text; checks compare in constant time and do the same work for unknown users (the cost
of a configured hash), so timing does not reveal who exists.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

USERS_ENV = "FINSENTINEL_DASHBOARD_USERS"
SCHEME = "scrypt"
# scrypt cost: 2**14 x 8 x 1 uses 16 MiB and ~50 ms per check on one core.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
# What a configured hash may cost per check (every sign-in attempt for its name pays it):
# 256 MiB, and 64 times the default's work (N x r x p); more is refused when the users are read.
MAX_SCRYPT_MEMORY = 256 * 2**20
MAX_SCRYPT_WORK = 64 * SCRYPT_N * SCRYPT_R * SCRYPT_P
MAX_SALT_BYTES = MAX_KEY_BYTES = 64
MIN_PASSWORD_CHARS = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class AuthConfigError(ValueError):
    """The users configured in the environment are missing or malformed."""


IDLE_ENV = "FINSENTINEL_DASHBOARD_IDLE_MINUTES"
IDLE_MINUTES = 30.0


def idle_minutes(environ: Mapping[str, str] | None = None) -> float:
    """Minutes without any action after which a session is signed out (``$IDLE_ENV``, default
    30; 0: never; blank: the default). AuthConfigError naming the variable for a bad value."""
    text = (os.environ if environ is None else environ).get(IDLE_ENV, "").strip()
    if not text:
        return IDLE_MINUTES
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise AuthConfigError(f"${IDLE_ENV}: expected minutes >= 0 (0: never sign out an idle "
                              f"session), got {text!r}")
    return value


@dataclass(frozen=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def encode(self) -> str:
        return "$".join((SCHEME, str(self.n), str(self.r), str(self.p), _b64(self.salt),
                         _b64(self.key)))

    @classmethod
    def decode(cls, text: str, where: str = "hash") -> PasswordHash:
        parts = text.strip().split("$")
        if len(parts) != 6 or parts[0] != SCHEME:
            raise AuthConfigError(f"{where}: expected scrypt$N$r$p$salt$key (as printed by "
                                  "`finsentinel dashboard hash-password`)")
        try:
            n, r, p = (int(x) for x in parts[1:4])
            salt, key = _unb64(parts[4]), _unb64(parts[5])
        except ValueError as exc:
            raise AuthConfigError(f"{where}: malformed scrypt parameters or base64") from exc
        if (n < 2 or n & (n - 1) or r < 1 or p < 1 or n * r * p > MAX_SCRYPT_WORK
                or _memory(n, r, p) > MAX_SCRYPT_MEMORY or n.bit_length() - 1 >= 16 * r
                or not 8 <= len(salt) <= MAX_SALT_BYTES
                or not 16 <= len(key) <= MAX_KEY_BYTES):
            raise AuthConfigError(
                f"{where}: scrypt parameters out of range (N a power of two below 2^(16 r), "
                f"at most {MAX_SCRYPT_MEMORY // 2**20} MiB and {MAX_SCRYPT_WORK:,} N x r x p "
                f"per check; salt 8-{MAX_SALT_BYTES} bytes, key 16-{MAX_KEY_BYTES} bytes)")
        return cls(n, r, p, salt, key)

    @property
    def cost(self) -> tuple[int, int, int, int]:
        """What a check against this hash computes: N, r, p and the key length."""
        return self.n, self.r, self.p, len(self.key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _memory(n: int, r: int, p: int) -> int:
    """Bytes scrypt allocates for these parameters (OpenSSL's B and V buffers)."""
    return 128 * r * (n + p + 2)


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=_memory(n, r, p) + (1 << 20), dklen=length)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
                  ) -> str:
    """A fresh salted scrypt hash of ``password``, as the text to put in the environment."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"password: at least {MIN_PASSWORD_CHARS} characters, got "
                         f"{len(password)}")
    salt = secrets.token_bytes(SALT_BYTES)
    return PasswordHash(n, r, p, salt, _derive(password, salt, n, r, p, KEY_BYTES)).encode()


def verify_password(stored: PasswordHash, password: str) -> bool:
    candidate = _derive(password, stored.salt, stored.n, stored.r, stored.p, len(stored.key))
    return hmac.compare_digest(candidate, stored.key)


@dataclass(frozen=True)
class Users:
    """The analysts allowed to sign in, by name."""

    hashes: Mapping[str, PasswordHash]

    @classmethod
    def parse(cls, text: str | None) -> Users:
        if not text or not text.strip():
            raise AuthConfigError(
                f"no dashboard users: set ${USERS_ENV} to name:hash pairs (make a hash with "
                "`finsentinel dashboard hash-password`); the dashboard never opens without "
                "sign-in")
        hashes: dict[str, PasswordHash] = {}
        for i, entry in enumerate(re.split(r"[,\s]+", text.strip()), 1):
            name, sep, encoded = entry.partition(":")
            where = f"${USERS_ENV} entry {i}" + (f" ({name!r})" if _NAME.match(name) else "")
            if not sep or not _NAME.match(name):
                raise AuthConfigError(f"{where}: expected name:hash with a name of letters, "
                                      "digits and . _ @ - (up to 64 characters)")
            if name in hashes:
                raise AuthConfigError(f"{where}: user {name!r} is listed twice")
            hashes[name] = PasswordHash.decode(encoded, where)
        return cls(hashes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Users:
        return cls.parse((os.environ if environ is None else environ).get(USERS_ENV))

    def authenticate(self, name: str, password: str) -> str | None:
        """The user's name if the password matches, else None (same work either way)."""
        stored = self.hashes.get(name.strip())
        if stored is None:  # burn the same time as a real check
            verify_password(self._dummy(name.strip()), password)
            return None
        return name.strip() if verify_password(stored, password) else None

    def _dummy(self, name: str) -> PasswordHash:
        """What an unknown name is checked against: the cost of one of the configured hashes
        (all the same, unless some were made with other parameters), chosen by the name with
        a per-process key, so a name answers in the same time each try and an unknown name
        cannot be told from a user by its time."""
        costs = sorted({h.cost for h in self.hashes.values()}) or [_DEFAULT_COST]
        pick = hmac.new(_DUMMY_KEY, name.encode("utf-8", "surrogatepass"), "sha256").digest()
        n, r, p, length = costs[int.from_bytes(pick[:8], "big") % len(costs)]
        return PasswordHash(n, r, p, b"\0" * SALT_BYTES, b"\0" * length)


_DEFAULT_COST = (SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
_DUMMY_KEY = secrets.token_bytes(32)


@dataclass
class SignInThrottle:
    """Failed sign-ins per user name, kept for the whole server process (every browser session):
    after ``max_failures`` within ``window_s`` the name is refused, without a password check,
    until the oldest of those failures is ``window_s`` old. A password guesser gets
    ``max_failures`` tries per window and name however many sessions it opens; names that do
    not exist are counted the same, so a refusal does not reveal who exists."""

    max_failures: int = 5
    window_s: float = 15 * 60.0
    clock: Callable[[], float] = time.monotonic
    max_names: int = 10_000  # names tracked at most (sprayed names cannot grow memory)
    _failures: dict[str, deque[float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def retry_after(self, name: str) -> float:
        """Seconds before ``name`` may try again; 0 when it may now."""
        with self._lock:
            recent = self._recent(name.strip())
            if len(recent) < self.max_failures:
                return 0.0
            return max(0.0, recent[0] + self.window_s - self.clock())

    def attempt(self, name: str) -> float:
        """Reserve a sign-in attempt for ``name`` before its password is checked: 0 and the
        attempt counted as a failure (until :meth:`succeeded` clears the name), or the seconds
        before it may try again. One step under the lock, so guesses sent in parallel cannot
        all pass the check before any failure is recorded."""
        with self._lock:
            recent = self._recent(name.strip())
            if len(recent) >= self.max_failures:
                return max(0.0, recent[0] + self.window_s - self.clock())
            self._record(name.strip())
            return 0.0

    def failed(self, name: str) -> None:
        with self._lock:
            self._record(name.strip())

    def _record(self, key: str) -> None:
        """A failure for ``key`` (the lock held)."""
        if key not in self._failures and len(self._failures) >= self.max_names:
            for other in list(self._failures):  # forget names whose failures expired
                self._recent(other)
            if len(self._failures) >= self.max_names:  # then the longest quiet one
                del self._failures[min(self._failures, key=lambda k: self._failures[k][-1])]
        self._failures.setdefault(key, deque()).append(self.clock())
        self._recent(key)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name.strip(), None)

    def _recent(self, key: str) -> deque[float]:
        """The name's failures within the window (older ones dropped; an empty entry too)."""
        failures = self._failures.get(key)
        if failures is None:
            return deque()
        cutoff = self.clock() - self.window_s
        while failures and failures[0] <= cutoff:
            failures.popleft()
        while len(failures) > self.max_failures:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return failures

