"""Prefect flow: score a large Parquet dataset partition by partition on a Dask cluster
(prefect-dask), each partition with the history margin its feature windows need
(pipeline.partitions). ``finsentinel score --partitions N`` runs it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from pydantic import SecretStr

from pipeline.artifacts import current_version, resolve
from pipeline.index import default_root, manifest_version
from pipeline.ledger import is_transient
from pipeline.partitions import (
    DatasetReport,
    Partition,
    PartitionReport,
    load_index,
    merge_parts,
    plan_partitions,
    score_partition,
)
from pipeline.privacy import flow_db_url
from pipeline.scoring import ScoringConfig
from pipeline.settings import DASK_ADDRESS_ENV, JobSettings


def _transient(_task: object, _run: object, state: State) -> bool:
    return is_transient(state.result(raise_on_failure=False))


@task(retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=_transient,
      cache_policy=NO_CACHE)
def score_one(input: str, partition: Partition, index: str, root: str, version: str,
              output: str, db: str | None, config: ScoringConfig, batch_id: str | None
              ) -> PartitionReport:
    """On a Dask worker: load the index once per worker, score the partition, record it."""
    return score_partition(input, partition, load_index(index, root, version), output, db=db,
                           config=config, batch_id=batch_id)


@flow(name="score_dataset", log_prints=True)
def score_dataset(input: str, index: str, output: str, partitions: int = 8,
                  db: str | SecretStr | None = None, root: str | None = None,
                  threshold: float = 0.5, alerts_per_day: int | None = None, k: int = 20,
                  batch_id: str | None = None) -> DatasetReport:
    """Score ``input`` in ``partitions`` time partitions, in parallel on the flow's task runner
    (see :func:`dask_runner`), against one version of index ``index`` (the current one when
    the run starts, for every partition), then join the scores into ``output``. Relative
    paths are taken from this process's folder: the workers run in folders of their own."""
    db = flow_db_url(db)
    input, output = str(Path(input).resolve()), str(Path(output).resolve())
    root = str(Path(root or default_root()).resolve())
    version = current_version(root, index)
    config = ScoringConfig(k=k, threshold=threshold, alerts_per_day=alerts_per_day)
    plan = plan_partitions(input, partitions)
    futures = [score_one.submit(input, p, index, root, version, output, db, config, batch_id)
               for p in plan]
    reports = [f.result() for f in futures]
    # As the partitions recorded it: the manifest's name, not the folder's (a copied index).
    run_version = manifest_version(resolve(root, index, version, verify=False)[1])
    report = merge_parts(input, reports, output, run_version)
    print(f"{report.rows_in} rows in {len(plan)} partitions: {report.rows_scored} scored, "
          f"{report.rows_quarantined} quarantined, {report.alerts} alerts, "
          f"{report.ledger_added} new ledger records")
    from pipeline.jobs import ledger_warning

    warning = ledger_warning(report, retry="the flow's batch_id parameter")
    if warning:
        get_run_logger().warning(warning)
    return report


def dask_address(address: str | None = None) -> str | None:
    """The scheduler to run on: ``address``, else ``$FINSENTINEL_DASK_ADDRESS``; blank is
    unset (None: a local cluster)."""
    return (address or "").strip() or JobSettings.from_env().dask_address


def check_scheduler(address: str, timeout: float | None = None) -> None:
    """Refuse ``address`` unless a Dask scheduler answers there within ``timeout`` seconds
    (default: dask's ``distributed.comm.timeouts.connect``, 30 s): distributed's client
    waits without a limit on a port that accepts connections but never answers (a proxy,
    another server), and retries a closed one until its timeout with the flow already
    started. ConnectionError (ValueError for an address that is no address), naming it."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import dask
    from dask.utils import parse_timedelta
    from distributed.comm import connect

    if timeout is None:
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
    where = f"Dask scheduler {address}"
    given = f"(set by --dask-address or ${DASK_ADDRESS_ENV})"

    async def identity() -> dict:
        # connect() retries a refused connection until `timeout`, then raises; its handshake
        # with a silent peer has no limit of its own.
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout + 1)
        try:
            await comm.write({"op": "identity"})
            return await asyncio.wait_for(comm.read(), timeout)
        finally:
            comm.abort()

    try:  # in a thread of its own: the caller may be running an event loop (a notebook)
        with ThreadPoolExecutor(1) as thread:
            info = thread.submit(asyncio.run, identity()).result()
    except TimeoutError:
        raise ConnectionError(f"{where}: no answer within {timeout:g} s; is a Dask scheduler "
                              f"listening there? {given}") from None
    except ValueError as exc:  # distributed's parser: no port, an unknown scheme
        raise ValueError(f"{where}: {exc}; expected tcp://HOST:PORT {given}") from None
    except OSError as exc:
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        reason = getattr(root, "strerror", None) or str(root) or type(root).__name__
        raise ConnectionError(f"{where}: cannot connect within {timeout:g} s ({reason}) "
                              f"{given}") from None
    if not isinstance(info, dict) or info.get("type") != "Scheduler":
        kind = info.get("type") if isinstance(info, dict) else None
        raise ConnectionError(f"{where}: answered, but is not a Dask scheduler"
                              + (f" (a {kind})" if kind else "") + f" {given}")


def dask_runner(address: str | None = None, workers: int = 2):
    """A DaskTaskRunner: on the scheduler at ``address`` (default ``$FINSENTINEL_DASK_ADDRESS``),
    checked to answer first (:func:`check_scheduler`), else on a local cluster of ``workers``
    single-threaded worker processes."""
    from prefect_dask import DaskTaskRunner

    address = dask_address(address)
    if address:
        check_scheduler(address)
        return DaskTaskRunner(address=address)
    if workers < 1:
        raise ValueError(f"workers: expected a whole number >= 1, got {workers}")
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True,
        "dashboard_address": None})


@contextmanager
def shared_prefect_api() -> Iterator[str]:
    """Give this process's Prefect API to the worker processes a local cluster starts.

    They start from this process's environment, where a temporary server's address (Prefect's
    default with no ``PREFECT_API_URL``, or a test harness's) is not: each would start a
    temporary server of its own (seconds per worker, and its task runs recorded where nobody
    looks). So the address goes into the environment before the cluster starts, after
    starting this process's temporary server if there is no server configured."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the one this process would start on first use
        server.start()
        url = server.api_url
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def score_dataset_on_dask(*, address: str | None = None, workers: int = 2,
                          **parameters: object) -> DatasetReport:
    """Run the flow on the Dask scheduler at ``address``, else on a local cluster of
    ``workers`` processes that report to this process's Prefect API. (Workers of a remote
    cluster report to the ``PREFECT_API_URL`` of their own environment.)"""
    address = dask_address(address)
    run = score_dataset.with_options(task_runner=dask_runner(address, workers))
    if address:
        return run(**parameters)
    with shared_prefect_api():
        return run(**parameters)
