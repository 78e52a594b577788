"""The transaction schema: canonical column names, types, and the aliases that map other
vocabularies (the fraud handbook's upper-case names, common card-processor names) onto it."""

from __future__ import annotations

import polars as pl

# Required for scoring: one row is one card payment.
TRANSACTION_ID = "transaction_id"
TX_TIME = "tx_time"
CUSTOMER_ID = "customer_id"
TERMINAL_ID = "terminal_id"
AMOUNT = "amount"
REQUIRED = (TRANSACTION_ID, TX_TIME, CUSTOMER_ID, TERMINAL_ID, AMOUNT)

# Optional descriptive fields: they make up the text that is embedded.
CURRENCY = "currency"
MERCHANT_NAME = "merchant_name"
MERCHANT_CATEGORY = "merchant_category"
CHANNEL = "channel"  # "card-present" | "card-not-present"
COUNTRY = "country"
DESCRIPTION = "description"
DESCRIPTIVE = (CURRENCY, MERCHANT_NAME, MERCHANT_CATEGORY, CHANNEL, COUNTRY, DESCRIPTION)

# Labels, present in training data only.
IS_FRAUD = "is_fraud"
FRAUD_SCENARIO = "fraud_scenario"
LABELS = (IS_FRAUD, FRAUD_SCENARIO)

CHANNELS = ("card-present", "card-not-present")

# Canonical dtypes after validation. Ids are strings so that integer, UUID and mixed ids
# from any source share one representation; times are naive UTC microseconds.
DTYPES: dict[str, pl.DataType] = {
    TRANSACTION_ID: pl.String(),
    TX_TIME: pl.Datetime("us"),
    CUSTOMER_ID: pl.String(),
    TERMINAL_ID: pl.String(),
    AMOUNT: pl.Float64(),
    CURRENCY: pl.String(),
    MERCHANT_NAME: pl.String(),
    MERCHANT_CATEGORY: pl.String(),
    CHANNEL: pl.String(),
    COUNTRY: pl.String(),
    DESCRIPTION: pl.String(),
    IS_FRAUD: pl.Int8(),
    FRAUD_SCENARIO: pl.Int8(),
}

# Lower-cased source name -> canonical name. The handbook's columns load without renaming.
ALIASES: dict[str, str] = {
    "transaction_id": TRANSACTION_ID,
    "tx_id": TRANSACTION_ID,
    "id": TRANSACTION_ID,
    "tx_datetime": TX_TIME,
    "tx_time": TX_TIME,
    "timestamp": TX_TIME,
    "datetime": TX_TIME,
    "transaction_time": TX_TIME,
    "customer_id": CUSTOMER_ID,
    "card_id": CUSTOMER_ID,
    "card": CUSTOMER_ID,
    "account_id": CUSTOMER_ID,
    "terminal_id": TERMINAL_ID,
    "merchant_id": TERMINAL_ID,
    "tx_amount": AMOUNT,
    "amount": AMOUNT,
    "currency": CURRENCY,
    "merchant_name": MERCHANT_NAME,
    "merchant": MERCHANT_NAME,
    "merchant_category": MERCHANT_CATEGORY,
    "mcc": MERCHANT_CATEGORY,
    "category": MERCHANT_CATEGORY,
    "channel": CHANNEL,
    "country": COUNTRY,
    "description": DESCRIPTION,
    "tx_fraud": IS_FRAUD,
    "is_fraud": IS_FRAUD,
    "fraud": IS_FRAUD,
    "label": IS_FRAUD,
    "tx_fraud_scenario": FRAUD_SCENARIO,
    "fraud_scenario": FRAUD_SCENARIO,
}

# The handbook's engineered features, in the handbook's names and order.
WINDOWS_DAYS = (1, 7, 30)
CUSTOMER_FEATURES = tuple(
    f"CUSTOMER_ID_{kind}_{n}DAY_WINDOW" for n in WINDOWS_DAYS for kind in ("NB_TX", "AVG_AMOUNT")
)
TERMINAL_FEATURES = tuple(
    f"TERMINAL_ID_{kind}_{n}DAY_WINDOW" for n in WINDOWS_DAYS for kind in ("NB_TX", "RISK")
)
TIME_FEATURES = ("TX_DURING_WEEKEND", "TX_DURING_NIGHT")
FEATURES = TIME_FEATURES + CUSTOMER_FEATURES + TERMINAL_FEATURES
# What the kNN vector and the handbook's models see: the amount plus the 14 engineered features.
MODEL_FEATURES = (AMOUNT, *FEATURES)
