"""``--backend ray``: each trial a Ray task, the study served to the tasks by Optuna's gRPC
storage proxy (or a shared ``--storage``)."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from lightrainer.config import Config
from lightrainer.errors import MissingDependencyError
from lightrainer.sweep.options import SweepOptions
from lightrainer.sweep.results import write_tables
from lightrainer.sweep.samplers import import_optuna
from lightrainer.sweep.space import Space
from lightrainer.sweep.states import counts_toward
from lightrainer.sweep.study import HOST, Job, job_config, open_storage, open_study, set_trial_attr
from lightrainer.sweep.trial import log_trial, one_line, quiet_logs, run_trial

log = logging.getLogger(__name__)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError('lightrainer tune --backend ray needs Ray: pip install "lightrainer[ray]"') from None
    return ray


def run_ray(job: Job, base: Config, space: Space, options: SweepOptions) -> None:
    """``--backend ray``: each trial a Ray task with ``--cpus_per_trial``/``--gpus_per_trial``, as
    many at once as the cluster fits (or ``--workers``). Without ``--storage`` the tasks reach the
    sweep's study through Optuna's gRPC storage proxy, served from this process."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=not job.quiet)
    resources = ray.cluster_resources()
    gpus = options.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 and base.device != "cpu" else 0.0
    fit = int(resources.get("CPU", 1) // options.cpus_per_trial)
    if gpus:
        fit = min(fit, int(resources.get("GPU", 0) // gpus))
    parallel = options.workers if options.workers > 1 else max(fit, 1)
    spec = dataclasses.replace(job, threads=max(int(options.cpus_per_trial), 1),
                               folder=str(Path(job.folder).resolve()))
    server = None
    if not options.storage:
        server, spec.storage = _serve_storage(job.storage, ray.util.get_node_ip_address())
    remote = ray.remote(num_cpus=options.cpus_per_trial, num_gpus=gpus, max_retries=0)(_ray_trial)
    storage = open_storage(job.storage)
    optuna = import_optuna()
    study = optuna.load_study(study_name=job.study_name, storage=storage)
    log.info("Ray: %d trial(s) at once, %g CPU and %g GPU each", parallel, options.cpus_per_trial, gpus)
    in_flight: dict[Any, int] = {}
    try:
        while True:
            counted = sum(counts_toward(t) for t in study.get_trials(deepcopy=False))
            open_slots = job.trials - counted - sum(1 for _ in in_flight)
            while open_slots > 0 and len(in_flight) < parallel and (job.deadline is None or time.time() < job.deadline):
                in_flight[remote.remote(spec.to_json())] = 0
                open_slots -= 1
            if not in_flight:
                break
            done, _ = ray.wait(list(in_flight), num_returns=1)
            ref = done[0]
            in_flight.pop(ref)
            try:
                log_trial(ray.get(ref), job.trials)
            except Exception as err:  # noqa: BLE001 - a task that died (worker crash, OOM kill)
                _fail_ray_trial(study, storage, ref, err)
            write_tables(study, Path(job.folder), space, base)
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        if server is not None:
            server.stop(grace=1)


def _fail_ray_trial(study: Any, storage: Any, ref: Any, err: BaseException) -> None:
    """A Ray task that died: its running trial is recorded as failed with the error."""
    task = ref.task_id().hex()
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name == "RUNNING" and trial.user_attrs.get("ray_task") == task:
            set_trial_attr(storage, study, trial.number, "error", one_line(err))
            study.tell(trial.number, state=import_optuna().trial.TrialState.FAIL)
    log.warning("a Ray trial task failed: %s", one_line(err))


def _serve_storage(url: str, host: str) -> tuple[Any, str]:
    """Serve the study database to Ray tasks with Optuna's gRPC storage proxy; (server, URL)."""
    try:
        from optuna.storages._grpc.server import make_server
    except ImportError:
        raise MissingDependencyError('--backend ray without --storage needs grpcio: pip install "lightrainer[ray]"') from None
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = make_server(open_storage(url), host, port)
    server.start()
    return server, f"grpc://{host}:{port}"


def _ray_trial(job_json: str) -> dict[str, Any]:
    """A Ray task: ask one trial of the sweep, run it, tell it; returns its summary."""
    job = Job.from_json(job_json)
    base, space = job_config(job)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    Path(job.folder).mkdir(parents=True, exist_ok=True)  # on another node: the trial's folder is there
    study = open_study(job, base, space, worker=os.getpid())
    trial = study.ask()
    import ray

    for key, value in (("host", HOST), ("pid", os.getpid()), ("ray_task", ray.get_runtime_context().get_task_id())):
        trial.set_user_attr(key, value)
    with quiet_logs(job.quiet):
        return run_trial(study, trial, base, space, Path(job.folder), job.quiet)
