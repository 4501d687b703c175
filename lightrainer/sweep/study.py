"""The sweep's Optuna study: the job that workers share, the storage it lives in, creating,
joining and opening it, and recovering the trials of a killed process."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml

from lightrainer.config import Config, ConfigError, load_config
from lightrainer.errors import MissingDependencyError
from lightrainer.sweep.samplers import PRUNERS, SAMPLERS, import_optuna
from lightrainer.sweep.sections import section_value
from lightrainer.sweep.space import Space
from lightrainer.sweep.space_file import parse_space
from lightrainer.sweep.states import dead_trials, pid_alive, reruns_needed
from lightrainer.task import resolve_fitness

log = logging.getLogger(__name__)

#: This machine: a trial records it, so that only its own machine judges whether its process is gone.
HOST = socket.gethostname()


@dataclass
class Job:
    """What a worker needs to run trials of a sweep (plain data: it travels to worker processes
    and Ray tasks as JSON)."""

    folder: str
    study_name: str
    storage: str
    trials: int
    sampler: str
    pruner: str
    config: str
    space: dict
    deadline: float | None = None
    import_paths: list = field(default_factory=list)
    quiet: bool = True
    threads: int | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))


def job_config(job: Job) -> tuple[Config, Space]:
    """The base config and space of a job (rebuilt from its plain data, in a worker)."""
    for folder in job.import_paths:
        if folder not in sys.path:
            sys.path.append(folder)
    base = load_config(yaml.safe_load(job.config))
    space = parse_space({**job.space, "sampler": job.sampler, "pruner": job.pruner}, base)
    return base, space


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url``: an SQLAlchemy database URL (sqlite:///..., postgresql://,
    mysql://) or ``grpc://host:port`` (Optuna's gRPC storage proxy).

    Raises:
        ConfigError: the database cannot be opened (names the URL's scheme and the cause).
        MissingDependencyError: the database's driver is not installed.
    """
    optuna = import_optuna()
    if url.startswith("grpc://"):
        host, _, port = url[len("grpc://"):].rpartition(":")
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=int(port))
        proxy.wait_server_ready(timeout=60)
        return proxy
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    scheme = url.split(":", 1)[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ImportError as err:
        raise MissingDependencyError(
            f"--storage {scheme}: the database driver is missing ({err}); install it (pip install psycopg2-binary "
            "for postgresql, pymysql for mysql+pymysql)"
        ) from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's ArgumentError, OperationalError...: the URL
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"tune: --storage {scheme}://...: cannot open the study database ({first})") from None


def _seed(cfg_seed: int, *parts: int) -> int:
    """A sampler seed per worker and per start, so that workers, and a resumed sweep, never
    repeat each other's random samples."""
    import numpy as np

    return int(np.random.SeedSequence([cfg_seed, *parts]).generate_state(1)[0])


def open_study(job: Job, cfg: Config, space: Space, worker: int = 0, storage: Any = None) -> Any:
    """The study of ``job`` with this worker's sampler and the sweep's pruner."""
    optuna = import_optuna()
    storage = storage or open_storage(job.storage)
    started = _trial_count(storage, job.study_name)
    sampler = SAMPLERS.get(job.sampler, "sampler")(space, _seed(cfg.seed, worker, started), job.trials)
    return optuna.load_study(study_name=job.study_name, storage=storage, sampler=sampler,
                             pruner=PRUNERS.get(job.pruner, "pruner")(cfg.epochs, job.trials))


def _trial_count(storage: Any, name: str) -> int:
    try:
        return len(storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False))
    except KeyError:
        return 0


def check_joined_study(storage: Any, name: str, base: Config, space: Space) -> None:
    """A study of that name in a shared storage must tune the same space on the same fitness.

    Raises:
        ConfigError: it tunes another space, fitness or direction.
    """
    optuna = import_optuna()
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return  # no such study yet: this machine creates it
    metric, mode = resolve_fitness(base.task_class, base.fitness)
    known = study.user_attrs.get("space")
    if (known is not None and known != space.to_data()) or study.user_attrs.get("fitness", metric) != metric:
        raise ConfigError(f"tune: the study {name!r} in --storage tunes another space or fitness; "
                          "give this sweep another --name, or the same space file")
    if study.direction.name.lower() != ("maximize" if mode == "max" else "minimize"):
        raise ConfigError(f"tune: the study {name!r} in --storage {study.direction.name.lower()}s, but {metric} is "
                          f"{'maximized' if mode == 'max' else 'minimized'}: give another --name")


def _baseline(base: Config, space: Space) -> dict[str, Any]:
    """The base config's own values of the space's keys, where the space holds them: the first
    trial of a new sweep trains the config as it is."""
    values = base.to_dict()
    out = {}
    for key in space.keys:
        value = section_value(base, key.key) if "." in key.key else values.get(key.key)
        if value is not None and key.contains(value):
            out[key.key] = value
    return out


def create_study(job: Job, base: Config, space: Space, storage: Any) -> Any:
    """Create the sweep's study (or join the one of that name in a shared storage) and record
    what it tunes; a new study's first trial runs the config's own values."""
    optuna = import_optuna()
    check_joined_study(storage, job.study_name, base, space)
    metric, mode = resolve_fitness(base.task_class, base.fitness)
    direction = "maximize" if mode == "max" else "minimize"
    study = optuna.create_study(storage=storage, study_name=job.study_name, direction=direction, load_if_exists=True)
    if study.user_attrs.get("space") is None:
        study.set_user_attr("space", space.to_data())
        study.set_user_attr("fitness", metric)
        baseline = _baseline(base, space) if job.sampler != "grid" else {}
        if baseline and not study.get_trials(deepcopy=False):
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
    return study


def set_trial_attr(storage: Any, study: Any, number: int, key: str, value: Any) -> None:
    """Set a user attribute of trial ``number``, which another (gone) process ran."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    storage.set_trial_user_attr(trial_id, key, value)


def recover(study: Any, storage: Any) -> list[int]:
    """Mark this machine's trials whose process is gone as interrupted and queue their values
    again (the interrupted trial is re-run); returns the numbers queued."""
    states = import_optuna().trial.TrialState
    for trial in dead_trials(study.get_trials(deepcopy=False), HOST, pid_alive):
        set_trial_attr(storage, study, trial.number, "interrupted", True)
        study.tell(trial.number, state=states.FAIL)
        log.info("trial %d was interrupted (its process is gone): it runs again", trial.number)
    queued = []
    for trial in reruns_needed(study.get_trials(deepcopy=False)):
        study.enqueue_trial(dict(trial.params), user_attrs={"rerun_of": trial.number})
        queued.append(trial.number)
    return queued


def live_trials(study: Any) -> list[Any]:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"
            and t.user_attrs.get("host") == HOST and pid_alive(int(t.user_attrs.get("pid", -1)))]
