"""finsentinel's library: fraud scoring by nearest-neighbour evidence, with an audit ledger.

Plain Python, usable without Prefect; the flows in ``flows/`` orchestrate these functions."""

__version__ = "0.1.0"
