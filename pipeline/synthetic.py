"""Synthetic card transactions: the project's embedded default data and the demo's data.

Follows the simulation of Le Borgne et al., *Reproducible Machine Learning for Credit Card
Fraud Detection - Practical Handbook*, chapter 3 ("Simulated dataset"):

- customers live at a uniform point of a 100 x 100 grid, spend ``N(mean, mean / 2)`` with
  ``mean ~ U(5, 100)`` (a negative draw is replaced by ``U(0, 2 * mean)``; cents), and make
  ``Poisson(mean_nb_tx_per_day)`` payments a day, ``mean_nb_tx_per_day ~ U(0, 4)``, at a time of
  day ``N(12:00, 20000 s)`` kept only inside the day;
- each payment goes to a terminal drawn uniformly among those within ``radius`` of home
  (customers with none make no payments);
- fraud: scenario 1, any amount over 220; scenario 2, each day 2 terminals are compromised for
  the next 28 days and all their payments in that time are fraud; scenario 3, each day 3
  customers' card details leak for the next 14 days and a third of their payments in that time
  are fraud with the amount multiplied by 5. Scenario 2 overrides 1, and 3 overrides both.

Deviations from the handbook, on purpose:

- Scenario 3 picks each of a leaked customer's payments with probability 1/3 (per leak that
  covers it) instead of exactly a third of the 14 days' payments: that needs the future, and
  the generator streams one chunk of days at a time in bounded memory. A payment picked by
  overlapping leaks is multiplied by 5 once, not 25 times.
- Every terminal is also a merchant with a name, a category, a channel (card-present or
  card-not-present) and a country with its currency, so that there is text to embed.
- To give that text a realistic, partial fraud signal, most scenario-3 frauds (stolen card
  details are used online) are re-routed from the customer's nearby terminal to a
  card-not-present terminal in the online retail, electronics, jewellery or travel categories,
  anywhere on the grid and often foreign. Genuine customers use card-not-present merchants too,
  so channel, category and country separate fraud from genuine only in part.

Randomness comes from independent streams spawned from ``numpy.random.SeedSequence(seed)``
(profiles, daily payments, compromise schedules, scenario-3 picks, re-routing) and is drawn day
by day, so the output depends on the config only, not on ``chunk_days``: the same config gives
byte-identical output.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from sklearn.neighbors import KDTree

from pipeline.schema import (
    AMOUNT,
    CHANNEL,
    CHANNELS,
    COUNTRY,
    CURRENCY,
    CUSTOMER_ID,
    DTYPES,
    FRAUD_SCENARIO,
    IS_FRAUD,
    MERCHANT_CATEGORY,
    MERCHANT_NAME,
    TERMINAL_ID,
    TRANSACTION_ID,
    TX_TIME,
)

COLUMNS = (
    TRANSACTION_ID,
    TX_TIME,
    CUSTOMER_ID,
    TERMINAL_ID,
    AMOUNT,
    CURRENCY,
    MERCHANT_NAME,
    MERCHANT_CATEGORY,
    CHANNEL,
    COUNTRY,
    IS_FRAUD,
    FRAUD_SCENARIO,
)
SCHEMA = pl.Schema({name: DTYPES[name] for name in COLUMNS})
# The merchant fields each payment copies from its terminal.
MERCHANT_FIELDS = (CURRENCY, MERCHANT_NAME, MERCHANT_CATEGORY, CHANNEL, COUNTRY)

GRID_SIZE = 100.0
SECONDS_PER_DAY = 86_400
TIME_OF_DAY_STD = 20_000.0

# Category -> (share of terminals, probability a terminal is card-not-present, name nouns).
CATEGORIES: dict[str, tuple[float, float, tuple[str, ...]]] = {
    "grocery": (0.17, 0.05, ("Grocers", "Market", "Foods", "Supermarket", "Fresh Market")),
    "fuel": (0.08, 0.0, ("Fuel", "Petrol Station", "Service Station", "Energy")),
    "restaurants": (0.15, 0.05, ("Bistro", "Kitchen", "Grill", "Diner", "Trattoria", "Cafe")),
    "electronics": (0.06, 0.5, ("Electronics", "Digital", "Tech Store", "Computers", "Mobile")),
    "travel": (0.05, 0.7, ("Travel", "Airways", "Tours", "Hotels", "Rail")),
    "online retail": (0.10, 0.95, ("Marketplace", "Shop", "Outlet", "Direct", "Store")),
    "jewellery": (0.03, 0.4, ("Jewellers", "Gold & Diamonds", "Watches", "Gems")),
    "pharmacy": (0.07, 0.1, ("Pharmacy", "Chemist", "Health", "Drugstore")),
    "apparel": (0.09, 0.3, ("Apparel", "Fashion", "Boutique", "Clothing Co", "Footwear")),
    "entertainment": (0.07, 0.5, ("Cinema", "Games", "Streaming", "Tickets", "Music")),
    "utilities": (0.05, 0.8, ("Energy Supply", "Water", "Telecom", "Broadband")),
    "cash withdrawal": (0.08, 0.0, ("Bank ATM", "Cash Point", "Savings ATM")),
}
# Where leaked card details are spent (scenario-3 re-routing targets).
FRAUD_PRONE_CATEGORIES = ("online retail", "electronics", "jewellery", "travel")

NAME_PREFIXES = (
    "Northgate", "Bluefin", "Redwood", "Silver Birch", "Harbour", "Kingsway", "Oakridge",
    "Maple", "Riverside", "Summit", "Crescent", "Lakeside", "Highland", "Granite", "Ashford",
    "Willow", "Beacon", "Meadow", "Cedar", "Foxglove", "Brightwater", "Stonebridge", "Orchard",
    "Evergreen", "Copper", "Westfield", "Sterling", "Falcon", "Juniper", "Hawthorne", "Pinnacle",
    "Thistle", "Marlow", "Greyfriars", "Seaview", "Larkspur",
)  # fmt: skip
ONLINE_SUFFIX = " Online"

COUNTRY_CURRENCY: dict[str, str] = {
    "GB": "GBP", "FR": "EUR", "DE": "EUR", "ES": "EUR", "IE": "EUR", "NL": "EUR", "BE": "EUR",
    "IT": "EUR", "US": "USD", "CH": "CHF", "PL": "PLN", "SE": "SEK", "AE": "AED", "CN": "CNY",
    "NG": "NGN", "BR": "BRL",
}  # fmt: skip

# Independent random streams; append new ones at the end so existing outputs do not change.
_STREAMS = ("customers", "terminals", "merchants", "days", "terminal_leaks", "customer_leaks",
            "card_fraud", "reroute")  # fmt: skip


def max_days(start: dt.date) -> int:
    """The most days a simulation from ``start`` may cover: its payments' times must stay
    datetimes (up to 9999-12-31, the last day Python and the readers of the file know)."""
    return (dt.date.max - start).days + 1


@dataclass(frozen=True)
class SyntheticConfig:
    """What to simulate. Defaults are the handbook's (5000 customers, 10000 terminals, 183 days
    from 2018-04-01, radius 5), which give about 1.75M payments and 0.8 % fraud."""

    n_customers: int = 5000
    n_terminals: int = 10000
    n_days: int = 183
    start_date: dt.date = dt.date(2018, 4, 1)
    radius: float = 5.0
    seed: int = 0
    chunk_days: int = 7
    # Fraud scenarios (handbook values).
    fraud_amount_threshold: float = 220.0
    compromised_terminals_per_day: int = 2
    terminal_compromise_days: int = 28
    compromised_customers_per_day: int = 3
    customer_compromise_days: int = 14
    compromised_share: float = 1 / 3
    fraud_amount_multiplier: float = 5.0
    # Merchant text (beyond the handbook).
    home_country: str = "GB"
    foreign_share_card_present: float = 0.03
    foreign_share_card_not_present: float = 0.25
    reroute_share: float = 0.8
    reroute_foreign_weight: float = 3.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"SyntheticConfig.{f.name}: expected an int, got {value!r}")
        positive = ("n_customers", "n_terminals", "n_days", "chunk_days", "radius",
                    "terminal_compromise_days", "customer_compromise_days",
                    "fraud_amount_multiplier", "reroute_foreign_weight")  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"SyntheticConfig.{name}: expected > 0, got {getattr(self, name)}")
        for name in ("compromised_terminals_per_day", "compromised_customers_per_day"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"SyntheticConfig.{name}: expected >= 0, got {getattr(self, name)}"
                )
        shares = ("compromised_share", "foreign_share_card_present",
                  "foreign_share_card_not_present", "reroute_share")  # fmt: skip
        for name in shares:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"SyntheticConfig.{name}: expected a share in [0, 1], got {getattr(self, name)}"
                )
        if self.home_country not in COUNTRY_CURRENCY:
            raise ValueError(
                f"SyntheticConfig.home_country: expected one of {sorted(COUNTRY_CURRENCY)}, "
                f"got {self.home_country!r}"
            )
        if not isinstance(self.start_date, dt.date) or isinstance(self.start_date, dt.datetime):
            raise TypeError(
                f"SyntheticConfig.start_date: expected a datetime.date, got {self.start_date!r}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SyntheticConfig.seed: expected an int >= 0, got {self.seed!r}")
        # Checked before any work: the schedule alone is drawn day by day for every day.
        if self.n_days > max_days(self.start_date):
            raise ValueError(
                f"SyntheticConfig.n_days: {self.n_days} days from {self.start_date} end past "
                f"{dt.date.max} (at most {max_days(self.start_date)} days from that start)"
            )


@dataclass(frozen=True, eq=False)
class Profiles:
    """Customer and terminal tables, and each customer's reachable terminals as CSR:
    customer ``i`` may pay at ``terminal_index[offsets[i]:offsets[i + 1]]``."""

    customers: pl.DataFrame  # customer_id, x, y, mean_amount, std_amount, mean_nb_tx_per_day
    terminals: pl.DataFrame  # terminal_id, x, y, merchant_name, category, channel, country, ...
    offsets: np.ndarray  # int64, n_customers + 1
    terminal_index: np.ndarray  # int64, flat terminal indices, ascending within a customer

    def available_terminals(self, customer: int) -> np.ndarray:
        """Terminal indices within the radius of ``customer``'s home."""
        return self.terminal_index[self.offsets[customer] : self.offsets[customer + 1]]


@dataclass(frozen=True, eq=False)
class CompromiseSchedule:
    """Who is compromised from which day: row ``d`` lists the terminals (scenario 2) and the
    customers (scenario 3) whose compromise starts on day ``d``."""

    terminals: np.ndarray  # int64, (n_days, compromised_terminals_per_day)
    customers: np.ndarray  # int64, (n_days, compromised_customers_per_day)


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    return {
        name: np.random.default_rng(child) for name, child in zip(_STREAMS, children, strict=True)
    }


def _reachable(
    customer_xy: np.ndarray, terminal_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, flat terminal indices) of the terminals strictly within ``radius`` of each
    customer, as the handbook's ``dist < r``; a KD-tree, not a customer x terminal distance
    matrix, so it scales to many customers. Sorted within a customer so that the terminal a
    draw picks does not depend on the tree's traversal order."""
    hits, dists = KDTree(terminal_xy).query_radius(customer_xy, r=radius, return_distance=True)
    hits = [np.sort(h[d < radius]) for h, d in zip(hits, dists, strict=True)]
    counts = np.fromiter((h.size for h in hits), dtype=np.int64, count=len(hits))
    offsets = np.zeros(len(hits) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, np.concatenate(hits).astype(np.int64)


def _merchants(config: SyntheticConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    names = list(CATEGORIES)
    share = np.array([CATEGORIES[c][0] for c in names])
    p_online = np.array([CATEGORIES[c][1] for c in names])
    category = rng.choice(len(names), size=config.n_terminals, p=share / share.sum())
    online = rng.random(config.n_terminals) < p_online[category]

    nouns = [np.array(CATEGORIES[c][2], dtype=object) for c in names]
    noun_len = np.array([len(n) for n in nouns])
    noun_start = np.concatenate([[0], np.cumsum(noun_len)[:-1]])
    noun = np.concatenate(nouns)[noun_start[category] + rng.integers(0, noun_len[category])]
    prefix = np.array(NAME_PREFIXES, dtype=object)[
        rng.integers(0, len(NAME_PREFIXES), config.n_terminals)
    ]
    suffix = np.where(online & (rng.random(config.n_terminals) < 0.7), ONLINE_SUFFIX, "")
    merchant_name = prefix + " " + noun + suffix

    foreign_pool = np.array(sorted(c for c in COUNTRY_CURRENCY if c != config.home_country))
    foreign_p = np.where(
        online, config.foreign_share_card_not_present, config.foreign_share_card_present
    )
    foreign = rng.random(config.n_terminals) < foreign_p
    country = np.where(
        foreign,
        foreign_pool[rng.integers(0, foreign_pool.size, config.n_terminals)],
        config.home_country,
    )
    return {
        MERCHANT_NAME: merchant_name.astype(str),
        MERCHANT_CATEGORY: np.array(names)[category],
        CHANNEL: np.where(online, CHANNELS[1], CHANNELS[0]),
        COUNTRY: country,
        CURRENCY: np.array([COUNTRY_CURRENCY[c] for c in country], dtype=object).astype(str),
    }


def build_profiles(config: SyntheticConfig) -> Profiles:
    """The customer and terminal tables of ``config`` (what ``generate`` simulates from)."""
    rngs = _streams(config.seed)
    rc, rt = rngs["customers"], rngs["terminals"]
    n_c, n_t = config.n_customers, config.n_terminals
    customer_xy = rc.uniform(0.0, GRID_SIZE, (n_c, 2))
    mean_amount = rc.uniform(5.0, 100.0, n_c)
    mean_nb_tx = rc.uniform(0.0, 4.0, n_c)
    terminal_xy = rt.uniform(0.0, GRID_SIZE, (n_t, 2))
    offsets, terminal_index = _reachable(customer_xy, terminal_xy, config.radius)

    customers = pl.DataFrame(
        {
            CUSTOMER_ID: pl.Series(np.arange(n_c)).cast(pl.String),
            "x": customer_xy[:, 0],
            "y": customer_xy[:, 1],
            "mean_amount": mean_amount,
            "std_amount": mean_amount / 2,
            "mean_nb_tx_per_day": mean_nb_tx,
            "n_terminals": np.diff(offsets),
        }
    )
    terminals = pl.DataFrame(
        {
            TERMINAL_ID: pl.Series(np.arange(n_t)).cast(pl.String),
            "x": terminal_xy[:, 0],
            "y": terminal_xy[:, 1],
            **{
                k: pl.Series(v, dtype=pl.String)
                for k, v in _merchants(config, rngs["merchants"]).items()
            },
        }
    )
    return Profiles(customers, terminals, offsets, terminal_index)


def compromise_schedule(config: SyntheticConfig) -> CompromiseSchedule:
    """The scenario-2 terminals and scenario-3 customers whose compromise starts each day."""
    rngs = _streams(config.seed)

    def draw(rng: np.random.Generator, population: int, per_day: int) -> np.ndarray:
        k = min(per_day, population)
        rows = [rng.choice(population, size=k, replace=False) for _ in range(config.n_days)]
        return np.array(rows, dtype=np.int64).reshape(config.n_days, k)

    return CompromiseSchedule(
        terminals=draw(
            rngs["terminal_leaks"], config.n_terminals, config.compromised_terminals_per_day
        ),
        customers=draw(
            rngs["customer_leaks"], config.n_customers, config.compromised_customers_per_day
        ),
    )


@dataclass
class _Day:
    """One simulated day's payments, sorted by time."""

    seconds: np.ndarray  # seconds since the start date
    customer: np.ndarray
    terminal: np.ndarray
    amount: np.ndarray
    scenario: np.ndarray


class _Simulator:
    """Draws days in order; all state lives in the random streams and the (precomputed)
    compromise schedule, so any split of the days into chunks gives the same payments."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.profiles = build_profiles(config)
        self.schedule = compromise_schedule(config)
        self.rngs = _streams(config.seed)
        c = self.profiles.customers
        self.mean_amount = c["mean_amount"].to_numpy()
        self.std_amount = c["std_amount"].to_numpy()
        self.mean_nb_tx = c["mean_nb_tx_per_day"].to_numpy()
        self.n_available = np.diff(self.profiles.offsets)

        t = self.profiles.terminals
        prone = (
            t[MERCHANT_CATEGORY].is_in(FRAUD_PRONE_CATEGORIES).to_numpy()
            & (t[CHANNEL] == CHANNELS[1]).to_numpy()
        )
        self.reroute_pool = np.flatnonzero(prone)
        weight = np.where(
            t[COUNTRY].to_numpy()[self.reroute_pool] != config.home_country,
            config.reroute_foreign_weight,
            1.0,
        )
        self.reroute_cdf = np.cumsum(weight) / weight.sum() if weight.size else weight

    def day(self, d: int) -> _Day:
        cfg, rng = self.config, self.rngs["days"]
        n_tx = rng.poisson(self.mean_nb_tx)
        customer = np.repeat(np.arange(cfg.n_customers), n_tx)
        n = customer.size
        seconds = np.floor(rng.normal(SECONDS_PER_DAY / 2, TIME_OF_DAY_STD, n))
        mean, std = self.mean_amount[customer], self.std_amount[customer]
        amount = rng.normal(mean, std)
        amount = np.where(amount < 0, rng.uniform(0.0, 2 * mean), amount)
        n_avail = self.n_available[customer]
        pick = rng.integers(0, np.maximum(n_avail, 1))
        keep = (seconds >= 0) & (seconds < SECONDS_PER_DAY) & (n_avail > 0)

        customer, seconds, amount = customer[keep], seconds[keep], np.round(amount[keep], 2)
        terminal = self.profiles.terminal_index[self.profiles.offsets[customer] + pick[keep]]
        order = np.argsort(seconds, kind="stable")
        customer, seconds, amount, terminal = (
            customer[order],
            seconds[order],
            amount[order],
            terminal[order],
        )
        scenario = self._label(d, customer, terminal, amount)
        return _Day(
            seconds=(seconds + d * SECONDS_PER_DAY).astype(np.int64),
            customer=customer,
            terminal=terminal,
            amount=amount,
            scenario=scenario,
        )

    def _label(
        self, d: int, customer: np.ndarray, terminal: np.ndarray, amount: np.ndarray
    ) -> np.ndarray:
        """Fraud scenario per payment (0 genuine); scenario 3 edits ``amount`` and ``terminal``
        in place."""
        cfg, sched = self.config, self.schedule
        scenario = np.zeros(customer.size, dtype=np.int8)
        scenario[amount > cfg.fraud_amount_threshold] = 1

        leaked_terminals = sched.terminals[max(0, d - cfg.terminal_compromise_days + 1) : d + 1]
        scenario[np.isin(terminal, leaked_terminals.ravel())] = 2

        leaks = sched.customers[max(0, d - cfg.customer_compromise_days + 1) : d + 1].ravel()
        n_leaks = np.bincount(leaks, minlength=cfg.n_customers)[customer]
        candidate = np.flatnonzero(n_leaks > 0)
        p = 1.0 - (1.0 - cfg.compromised_share) ** n_leaks[candidate]
        picked = candidate[self.rngs["card_fraud"].random(candidate.size) < p]
        amount[picked] = np.round(amount[picked] * cfg.fraud_amount_multiplier, 2)
        scenario[picked] = 3

        rng = self.rngs["reroute"]
        move, where = rng.random(picked.size), rng.random(picked.size)
        if self.reroute_pool.size:
            moved = move < cfg.reroute_share
            slot = np.searchsorted(self.reroute_cdf, where[moved], side="right")
            terminal[picked[moved]] = self.reroute_pool[
                np.minimum(slot, self.reroute_pool.size - 1)
            ]
        return scenario


def _frame(sim: _Simulator, days: list[_Day], first_id: int) -> pl.DataFrame:
    seconds = np.concatenate([d.seconds for d in days])
    terminal = np.concatenate([d.terminal for d in days])
    scenario = np.concatenate([d.scenario for d in days])
    start = dt.datetime.combine(sim.config.start_date, dt.time())
    start_us = (start - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)
    merchants = sim.profiles.terminals
    frame = pl.DataFrame(
        {
            TRANSACTION_ID: pl.Series(np.arange(first_id, first_id + seconds.size)),
            TX_TIME: pl.Series(start_us + seconds * 1_000_000, dtype=pl.Int64),
            CUSTOMER_ID: pl.Series(np.concatenate([d.customer for d in days])),
            TERMINAL_ID: pl.Series(terminal),
            AMOUNT: pl.Series(np.concatenate([d.amount for d in days]), dtype=pl.Float64),
            **{c: merchants[c].gather(terminal) for c in MERCHANT_FIELDS},
            IS_FRAUD: pl.Series(scenario > 0, dtype=pl.Int8),
            FRAUD_SCENARIO: pl.Series(scenario, dtype=pl.Int8),
        }
    )
    return frame.select(pl.col(name).cast(dtype) for name, dtype in SCHEMA.items())


def iter_chunks(config: SyntheticConfig) -> Iterator[pl.DataFrame]:
    """Payments ``chunk_days`` days at a time, in time order, ids continuing across chunks."""
    sim = _Simulator(config)
    next_id = 0
    for first in range(0, config.n_days, config.chunk_days):
        days = [sim.day(d) for d in range(first, min(first + config.chunk_days, config.n_days))]
        chunk = _frame(sim, days, next_id)
        next_id += chunk.height
        yield chunk


def generate(config: SyntheticConfig) -> pl.DataFrame:
    """All payments of ``config`` in memory: for small configs (tests, demos)."""
    return pl.concat([SCHEMA.to_frame(), *iter_chunks(config)], how="vertical")


def write_parquet(
    config: SyntheticConfig,
    path: str | Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Stream the payments of ``config`` into one Parquet file, one row group per chunk of days,
    holding one chunk in memory. Writes a temporary file beside ``path`` and renames it, so
    ``path`` is either the old file or the complete new one. Returns the number of rows."""
    path = Path(path)
    arrow_schema = SCHEMA.to_frame().to_arrow().schema
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    rows = days_done = 0
    try:
        with pq.ParquetWriter(str(tmp), arrow_schema) as writer:
            for chunk in iter_chunks(config):
                table = chunk.to_arrow()
                writer.write_table(table, row_group_size=max(table.num_rows, 1))
                rows += chunk.height
                days_done = min(days_done + config.chunk_days, config.n_days)
                if progress is not None:
                    progress(days_done, config.n_days)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows


def n_chunks(config: SyntheticConfig) -> int:
    """Number of chunks (and Parquet row groups) ``config`` produces."""
    return math.ceil(config.n_days / config.chunk_days)
