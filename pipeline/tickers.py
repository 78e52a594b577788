"""Which tickers a news text is about: cashtags (``$AAPL``), crypto symbols and names (BTC,
bitcoin, ETH, ether, …) and a configurable company-name -> ticker map.

Bare upper-case words are not taken as equity tickers ("CEO", "IT", "A" are words too); equities
need a cashtag or a company name in the map. Crypto symbols are distinctive enough to match as
whole upper-case words (an alias, given or as a cashtag too, counts under its canonical ticker:
XBT -> BTC); crypto names match case-insensitively, except those that are ordinary words too
("ripple", "avalanche", "tether"), which need a capital.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Canonical crypto tickers, each with its upper-case symbols and lower-case names.
CRYPTO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "BTC": (("BTC", "XBT"), ("bitcoin", "bitcoins")),
    "ETH": (("ETH",), ("ethereum", "ether")),
    "SOL": (("SOL",), ("solana",)),
    "XRP": (("XRP",), ("ripple",)),
    "ADA": (("ADA",), ("cardano",)),
    "DOGE": (("DOGE",), ("dogecoin",)),
    "BNB": (("BNB",), ("binance coin",)),
    "LTC": (("LTC",), ("litecoin",)),
    "DOT": (("DOT",), ("polkadot",)),
    "AVAX": (("AVAX",), ("avalanche",)),
    "USDT": (("USDT",), ("tether",)),
    "USDC": (("USDC",), ()),
}
# A few well-known names; deployments pass their own map (JSON {"name": "TICKER"}).
DEFAULT_COMPANIES: dict[str, str] = {
    "apple": "AAPL", "microsoft": "MSFT", "alphabet": "GOOGL", "google": "GOOGL",
    "amazon": "AMZN", "nvidia": "NVDA", "tesla": "TSLA", "meta platforms": "META",
    "netflix": "NFLX", "jpmorgan": "JPM", "goldman sachs": "GS", "coinbase": "COIN",
}
# Crypto names that are also ordinary words ("a ripple through markets", "an avalanche of
# selling", "tether rates to"): matched only capitalised or upper-case, as names are written.
COMMON_WORD_NAMES = frozenset({"ripple", "avalanche", "tether"})
TICKER_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9.\-]{0,14}$")
_CASHTAG = re.compile(r"(?<![\w$])\$([A-Za-z]{1,6}(?:[.\-][A-Za-z]{1,2})?)\b")


@dataclass
class TickerExtractor:
    """Find tickers in text; ``companies`` maps lower-case names to tickers."""

    companies: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_COMPANIES))
    crypto: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=lambda: dict(CRYPTO))

    def __post_init__(self) -> None:
        for name, ticker in self.companies.items():
            if not name.strip():  # would match the empty text between any two non-letters
                raise ValueError(f"company map: blank company name (-> {ticker!r}); every "
                                 "name must have at least one non-space character")
            if not TICKER_PATTERN.match(ticker):
                raise ValueError(f"company map: {name!r} -> {ticker!r} is not a ticker symbol "
                                 "(upper-case letters, digits, '.' or '-')")
        symbols = {s: t for t, (syms, _) in self.crypto.items() for s in syms}
        names = {n.lower(): t for t, (_, ns) in self.crypto.items() for n in ns}
        companies = {k.lower(): v for k, v in self.companies.items()}
        # A common word among the crypto names needs a capital (a company map's names, any
        # case: the deployment chose them).
        worded = {n: t for n, t in names.items()
                  if n in COMMON_WORD_NAMES and n not in companies}
        names = {n: t for n, t in names.items() if n not in worded}
        names.update(companies)
        self._symbols = symbols
        self._names = names
        self._worded = {form: t for n, t in worded.items()
                        for form in (n.capitalize(), n.upper(), n.title())}
        self._symbol_re = _words(symbols, flags=0)
        self._name_re = _words(names, flags=re.IGNORECASE)
        self._worded_re = _words(self._worded, flags=0)

    @classmethod
    def from_file(cls, path: str | Path | None) -> TickerExtractor:
        """Defaults plus a JSON map of company names to tickers (if given)."""
        if path is None:
            return cls()
        try:
            extra = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: expected a JSON object of company name -> ticker ({exc})"
                             ) from exc
        if not isinstance(extra, dict):
            raise ValueError(f"{path}: expected a JSON object of company name -> ticker")
        return cls({**DEFAULT_COMPANIES, **{str(k).lower(): str(v) for k, v in extra.items()}})

    def extract(self, text: str | None) -> list[str]:
        """Tickers in order of first mention, each once."""
        if not text:
            return []
        found: list[tuple[int, str]] = []
        for match in _CASHTAG.finditer(text):
            found.append((match.start(), self.canonical(match.group(1).upper())))
        if self._symbol_re is not None:
            found += [(m.start(), self._symbols[m.group(0)])
                      for m in self._symbol_re.finditer(text)]
        if self._name_re is not None:
            found += [(m.start(), self._names[m.group(0).lower()])
                      for m in self._name_re.finditer(text)]
        if self._worded_re is not None:
            found += [(m.start(), self._worded[m.group(0)])
                      for m in self._worded_re.finditer(text)]
        return list(dict.fromkeys(ticker for _, ticker in sorted(found)))

    def canonical(self, ticker: str) -> str:
        """A crypto symbol's canonical ticker (XBT -> BTC); any other ticker as it is."""
        return self._symbols.get(ticker, ticker)

    def extract_all(self, *texts: str | None, given: Iterable[str] = ()) -> list[str]:
        """Tickers given with the item first, then those found in the texts."""
        out = [self.canonical(t) for t in given]
        for text in texts:
            out += self.extract(text)
        return list(dict.fromkeys(out))


def _words(terms: Mapping[str, str], flags: int) -> re.Pattern[str] | None:
    if not terms:
        return None
    # Longest first so "binance coin" wins over a shorter overlapping name.
    alternatives = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    return re.compile(rf"(?<![\w$])(?:{alternatives})(?!\w)", flags)
