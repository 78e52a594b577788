"""Prefect flow: the monthly audit export — verify the ledger, export the month's decisions
(pseudonymised ids) and write the month's day anchors beside them.

Served on a schedule with ``python -m flows.export_audit`` (03:00 UTC on the 1st, exporting the
month before)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from pydantic import SecretStr

from pipeline import audit
from pipeline.ledger import Ledger, LedgerError, is_transient
from pipeline.privacy import flow_db_url
from pipeline.settings import JobSettings

MONTHLY_CRON = "0 3 1 * *"


def _transient(_task: object, _run: object, state: State) -> bool:
    """Retry only what another attempt can fix (locks, dropped connections), not a missing key."""
    return is_transient(state.result(raise_on_failure=False))


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient, cache_policy=NO_CACHE)
def export_month(db: str | None, month: str, format: str, out: str, reveal: bool
                 ) -> audit.ExportReport:
    since, until = audit.month_range(month)
    with Ledger(db) as ledger:
        return audit.export(ledger, out, format, since, until, reveal=reveal)


@flow(name="export_audit", log_prints=True)
def export_audit(month: str | None = None, format: str = "jsonl",
                 out_dir: str | None = None, db: str | SecretStr | None = None,
                 reveal: bool = False) -> audit.ExportReport:
    """Export the decisions recorded in ``month`` ("YYYY-MM", default: last month) to
    ``out_dir/ledger-YYYY-MM.<format>``, with the rows the month's batches quarantined in
    ``ledger-YYYY-MM.quarantine.<format>`` and ``.anchors.json`` beside it. The run fails when the
    ledger does not verify — the export is still written, stating so — so that a tampered
    ledger never passes as a routine monthly export. An earlier export of the month is
    replaced only by one of a ledger that verifies, against the anchors beside it too (see
    :func:`pipeline.audit.export`). A SQLite ledger file that is not there, or a database
    without a ledger, is refused, not opened as a new empty ledger. ``out_dir`` defaults to
    ``$FINSENTINEL_WORKDIR/audit``."""
    db = flow_db_url(db)
    out_dir = out_dir or str(JobSettings.from_env().audit)
    month = month or audit.previous_month()
    audit.month_range(month)  # a malformed month fails here, before any work
    if format not in audit.FORMATS:
        raise ValueError(f"format: expected one of {', '.join(audit.FORMATS)}, got {format!r}")
    audit.require_ledger(db, "the audit export", "db")  # else an empty ledger "verifies"
    out = Path(out_dir) / f"ledger-{month}.{format}"
    report = export_month(db, month, format, str(out), reveal)
    create_table_artifact(
        key="audit-export",
        table=[{"month": month, "format": format, "decisions": report.rows,
                "quarantined_rows": report.quarantined,
                "day_anchors": report.anchors, "ledger_verified": report.verified,
                "ids": "pseudonymised" if report.pseudonymised else "raw",
                "file": report.path}],
        description=f"Audit export for {month}",
    )
    print(f"audit export {month}: {report.rows} decisions to {report.path}; "
          f"{report.quarantined} quarantined rows to {report.quarantine_path}; "
          f"{report.anchors} day anchors to {report.anchors_path}; ledger verified: "
          f"{report.verified}")
    if not report.verified:
        raise LedgerError(f"audit export {month}: the ledger does not verify: "
                          f"{report.verify_reason}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve the export_audit flow on a schedule (by default 03:00 UTC on the "
                    "1st, exporting the month before).")
    parser.add_argument("--format", default="jsonl", choices=audit.FORMATS)
    parser.add_argument("--out-dir", help="default $FINSENTINEL_WORKDIR/audit")
    parser.add_argument("--db", help="ledger URL without a password (else FINSENTINEL_DB)")
    parser.add_argument("--reveal", action="store_true",
                        help="raw card/terminal ids instead of pseudonyms")
    parser.add_argument("--cron", default=MONTHLY_CRON)
    args = parser.parse_args(argv)
    flow_db_url(args.db)  # a password in it is refused before anything is served
    export_audit.serve(name="monthly-audit-export", cron=args.cron, parameters={
        "format": args.format, "out_dir": args.out_dir, "db": args.db, "reveal": args.reveal})


if __name__ == "__main__":
    main()
