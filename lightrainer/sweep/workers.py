"""A worker's loop (ask a trial, run it, tell it, until ``--trials`` count) and ``--workers K``:
K processes on this machine sharing the study."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from lightrainer.config import Config, config_yaml
from lightrainer.sweep.results import write_tables
from lightrainer.sweep.samplers import import_optuna
from lightrainer.sweep.space import Space
from lightrainer.sweep.states import counts_toward
from lightrainer.sweep.study import HOST, Job, job_config, open_study
from lightrainer.sweep.trial import log_trial, run_trial

log = logging.getLogger(__name__)

#: Environment variable that hands a worker process its job (JSON).
JOB_ENV = "LIGHTRAINER_SWEEP_JOB"


@contextlib.contextmanager
def _ask_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock over "count the trials, then ask one" among this machine's workers, so
    they never start more than ``--trials`` (released by the OS when a process is killed)."""
    try:
        import fcntl
    except ImportError:  # Windows: the check after ask() covers it
        yield
        return
    with open(folder / ".ask.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ask_trial(study: Any, folder: Path, trials: int, worker: int = 0) -> Any | None:
    """The next trial to run, or None when ``trials`` trials count already."""
    with _ask_lock(folder):
        if sum(counts_toward(t) for t in study.get_trials(deepcopy=False)) >= trials:
            return None
        trial = study.ask()
        for key, value in (("host", HOST), ("pid", os.getpid()), ("worker", worker)):
            trial.set_user_attr(key, value)
    ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counts_toward(t)]
    if len(ahead) >= trials:
        # Another machine took the last trial at the same moment.
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=import_optuna().trial.TrialState.FAIL)
        return None
    return trial


def work(job: Job, base: Config, space: Space, worker: int = 0, study: Any = None, prefix: str = "") -> int:
    """Run trials of ``job`` until ``job.trials`` count (or the deadline passes).

    Args:
        prefix: what this worker's lines start with (``[worker 1] ``).

    Returns:
        The number of trials this worker ran.
    """
    study = study or open_study(job, base, space, worker)
    folder = Path(job.folder)
    ran = 0
    while job.deadline is None or time.time() < job.deadline:
        trial = ask_trial(study, folder, job.trials, worker)
        if trial is None:
            break
        summary = run_trial(study, trial, base, space, folder, job.quiet)
        ran += 1
        log_trial(summary, job.trials, prefix)
        write_tables(study, folder, space, base)
    return ran


def worker_main() -> int:
    """Entry of a ``--workers`` process: the job comes in ``$LIGHTRAINER_SWEEP_JOB``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    job = Job.from_json(os.environ[JOB_ENV])
    worker = int(os.environ.get("LIGHTRAINER_SWEEP_WORKER", "0"))
    base, space = job_config(job)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    work(job, base, space, worker, prefix=f"[worker {worker}] ")
    return 0


def _gpu_ids(cfg: Config) -> list[int]:
    """The GPUs worker processes are placed on (one each, round robin); none on a CPU run."""
    import torch

    if cfg.device in ("cpu", "mps") or not torch.cuda.is_available():
        return []
    return list(cfg.device) if isinstance(cfg.device, list) else list(range(torch.cuda.device_count()))


def run_workers(job: Job, workers: int, base: Config) -> None:
    """``--workers K``: K processes on this machine, each running trials of the shared study
    (one GPU each where there are GPUs, else an equal share of the CPU cores)."""
    gpus = _gpu_ids(base)
    threads = max((os.cpu_count() or 1) // workers, 1)
    procs = []
    for worker in range(workers):
        env = {**os.environ, "LIGHTRAINER_SWEEP_WORKER": str(worker)}
        spec = dataclasses.replace(job, threads=None if gpus else threads)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(gpus[worker % len(gpus)])
            spec.config = config_yaml(base.replace(device=None, devices=None))
        else:
            env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        env[JOB_ENV] = spec.to_json()
        code = "import sys; from lightrainer.sweep.workers import worker_main; sys.exit(worker_main())"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env))
    log.info("%d worker processes: %s", workers,
             ", ".join(f"GPU {gpus[w % len(gpus)]}" for w in range(workers)) if gpus else f"{threads} thread(s) each")
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    failed = [w for w, code in enumerate(codes) if code]
    if failed:
        log.warning("worker(s) %s stopped with an error (their trials are in the study; --resume runs the "
                    "interrupted ones again)", ", ".join(map(str, failed)))
