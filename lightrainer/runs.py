"""Run folders on disk: how they are named and claimed, what a killed run left behind, and which
of a run's checkpoints is complete.

A run lives in ``save_dir/name``; later runs of the same name get numbered siblings (see
:func:`numbered_name`). A folder is claimed with an exclusive ``mkdir``, so processes that start
together never share one. Files are written through :mod:`lightrainer.io` under temporary names
``.NAME.tmpPID``; a process killed mid-write leaves one behind, which the next start removes
(:func:`remove_stale_temp_files`). This module decides and reads; it never writes a file.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from lightrainer.errors import ConfigError
from lightrainer.io import TMP_MARK, TMP_PREFIX, PathLike
from lightrainer.record import class_path_of

log = logging.getLogger(__name__)

#: The entries Lightning writes into every checkpoint it saves (a lightrainer ``.ckpt`` holds them).
LIGHTNING_ENTRIES = ("pytorch-lightning_version", "state_dict")
#: A run's resumable checkpoints, in ``weights/``; on a tie the first is preferred.
CHECKPOINT_NAMES = ("last.ckpt", "best.ckpt")
#: A file in a run folder that names the SLURM job that trains it (``requeue: True``).
SLURM_JOB_FILE = "slurm_job"

_TEMP_NAME = re.compile(rf"^{re.escape(TMP_PREFIX)}(?P<name>.+){re.escape(TMP_MARK)}(?P<pid>[0-9]+)$")
_RUN_NUMBER = re.compile(r"[1-9][0-9]*")


# ------------------------------------------------------------------------------ names
def numbered_name(name: str, n: int) -> str:
    """The folder name of the ``n``-th run called ``name``: ``name`` itself for the first, then
    ``name2``, ``name3``, ... (as Ultralytics numbers ``exp``, ``exp2``). A name that ends in a
    digit gets a dash, ``resnet18-2``, so the user's name is never cut or changed and the run
    number stays readable: ``resnet182`` would read as another network.

    Args:
        name: the ``name`` key.
        n: 1 for the first run, 2 for the second, ...
    """
    if n == 1:
        return name
    return f"{name}-{n}" if name[-1:].isdigit() else f"{name}{n}"


def run_number(name: str, folder_name: str) -> Optional[int]:
    """Which run of ``name`` the folder ``folder_name`` is (1, 2, ...), or None when it is not one
    of them: ``exp2`` is run 2 of ``exp``; ``exp_other`` and ``exp-x`` are not runs of ``exp``;
    ``resnet182`` is not a run of ``resnet18`` (its second run is ``resnet18-2``)."""
    if folder_name == name:
        return 1
    if not folder_name.startswith(name):
        return None
    tail = folder_name[len(name):]
    if name[-1:].isdigit():
        if not tail.startswith("-"):
            return None
        tail = tail[1:]
    if not _RUN_NUMBER.fullmatch(tail) or int(tail) < 2:
        return None
    return int(tail)


def run_folders(save_dir: PathLike, name: str) -> list[Path]:
    """``save_dir/name`` and its numbered siblings that exist, in run order (never another name
    that merely starts the same: what ``--resume`` may look at)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [(run_number(name, p.name), p) for p in root.iterdir() if p.is_dir()]
    return [p for n, p in sorted((n, p) for n, p in found if n is not None)]


def create_run_dir(save_dir: PathLike, name: str, exist_ok: bool = False) -> Path:
    """Claim and create the run folder: ``save_dir/name``, else its first free numbered sibling.

    Each candidate is created with an exclusive ``mkdir`` (it fails when the name exists) and the
    next number is tried on failure, so processes that start together (a sweep, a job array) each
    get a folder of their own without a lock; a check-then-create would let two of them take the
    same one.

    Args:
        save_dir: the folder that holds the runs (created if missing).
        name: the run's name (validated: a single folder name).
        exist_ok: use ``save_dir/name`` even if it exists.

    Returns:
        The created (or, with ``exist_ok``, reused) folder.

    Raises:
        ConfigError: the folder cannot be created (``save_dir`` is a file, not writable, ...).
    """
    root = Path(save_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if exist_ok:
            path = root / name
            path.mkdir(exist_ok=True)
            return path
        n = 1
        while True:
            path = root / numbered_name(name, n)
            try:
                path.mkdir(parents=True)  # parents: save_dir may be removed by a run that failed to start
                return path
            except FileExistsError:
                n += 1
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(
            f"save_dir: cannot create the run folder {root / name}: {reason}; "
            "choose a save_dir that is a writable folder"
        ) from None


def remove_if_empty(folder: PathLike) -> bool:
    """Remove ``folder`` when it holds no file at any depth (only empty folders, such as the
    ``weights/`` and ``logs/`` of a run that failed before it wrote anything).

    Returns:
        Whether the folder was removed. A folder holding any file or link is left as it is.
    """
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    empty_dirs = []
    for here, subdirs, files in os.walk(folder):
        if files or any(os.path.islink(os.path.join(here, d)) for d in subdirs):
            return False
        empty_dirs.append(here)
    try:
        for here in reversed(empty_dirs):  # deepest first
            os.rmdir(here)
    except OSError:
        return False  # something appeared meanwhile: keep it
    return True


def remove_unused_run_dir(run_dir: PathLike, save_dir: Optional[PathLike] = None) -> bool:
    """Remove a run folder that holds no file (:func:`remove_if_empty`), then ``save_dir`` (made
    for this run) when that left it empty: only that folder itself, so a sibling run folder that
    another process has just claimed keeps it.

    Returns:
        Whether the run folder was removed.
    """
    removed = remove_if_empty(run_dir)
    if removed and save_dir is not None:
        try:
            os.rmdir(save_dir)
        except OSError:
            pass  # not empty, or gone
    return removed


# ------------------------------------------------------------------------------ temporary files
def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` (the writer of a temporary file) may still be running."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no harmless liveness probe (os.kill terminates there): keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OSError:
        return True
    return True


def stale_temp_files(folder: PathLike) -> list[Path]:
    """Temporary files of :mod:`lightrainer.io` (``.NAME.tmpPID``) in ``folder`` whose writer
    process no longer runs on this machine: what a killed run left behind.

    A temporary file of a process that still runs (this one included) is never listed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for path in sorted(folder.iterdir()):
        match = _TEMP_NAME.match(path.name)
        if match and path.is_file() and not path.is_symlink() and not _writer_alive(int(match["pid"])):
            stale.append(path)
    return stale


def remove_stale_temp_files(run_dir: PathLike) -> int:
    """Remove the stale temporary files (:func:`stale_temp_files`) of a run folder and its
    ``weights/`` folder, at the start of a run or a resume; logs how many were removed.

    Returns:
        The number of files removed.
    """
    run_dir = Path(run_dir)
    removed = 0
    for folder in (run_dir, run_dir / "weights"):
        for path in stale_temp_files(folder):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
    if removed:
        log.info("removed %d temporary file(s) that a killed run left in %s", removed, run_dir)
    return removed


# ------------------------------------------------------------------------------ checkpoints
def check_checkpoint_payload(payload: Any, task_class: Optional[type] = None, source: str = "the checkpoint") -> None:
    """Check what a ``.ckpt`` file held (loaded as data) before anything is built from it.

    Args:
        payload: the loaded checkpoint.
        task_class: the task the run asks for; None skips the task check.
        source: how messages name the file (its path).

    Raises:
        ConfigError: not a dict or no ``lightrainer`` entry (not a lightrainer checkpoint, or
            damaged); Lightning's own entries missing; a checkpoint of another task.
    """
    if not isinstance(payload, Mapping) or not isinstance(payload.get("lightrainer"), Mapping):
        raise ConfigError(
            f"{source} is not a lightrainer checkpoint, or it is damaged (it has no 'lightrainer' entry): "
            "resume from <run>/weights/last.ckpt of a lightrainer run"
        )
    missing = [key for key in LIGHTNING_ENTRIES if key not in payload]
    if missing:
        raise ConfigError(
            f"{source} is not a complete Lightning checkpoint (no {', '.join(repr(k) for k in missing)} entry): "
            "resume from <run>/weights/last.ckpt, not from a weights/*.pt file or an edited checkpoint"
        )
    if task_class is None:
        return
    recorded = payload["lightrainer"].get("task")
    asked = class_path_of(task_class)
    if recorded != asked:
        what = f"of task {recorded}" if recorded else "that records no task"
        raise ConfigError(
            f"{source} is a checkpoint {what}, not of {asked}: resume a run with the config (task) "
            "it was trained with, or start a new run"
        )


def load_checkpoint(path: PathLike, task_class: Optional[type] = None) -> dict[str, Any]:
    """A lightrainer ``.ckpt`` loaded as data (``torch.load(weights_only=True)``) and checked.

    Args:
        path: the checkpoint file.
        task_class: the task the run asks for (see :func:`check_checkpoint_payload`).

    Returns:
        The checkpoint.

    Raises:
        ConfigError: missing, not a file, unreadable, damaged, holding objects that are not plain
            data, or failing :func:`check_checkpoint_payload`. The message never suggests loading
            the file as code.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path} is not a checkpoint file (it is a folder or a device)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's message here advises weights_only=False, i.e. running the file's code: never.
        reason = "it holds objects other than tensors and plain values"
    except (OSError, EOFError, RuntimeError, ValueError, MemoryError) as err:
        reason = f"it cannot be read ({type(err).__name__}: truncated or corrupt?)"
    else:
        check_checkpoint_payload(payload, task_class, str(path))
        return payload
    raise ConfigError(f"{path} is not a lightrainer checkpoint, or it is damaged: {reason}")


def newest_complete_checkpoint(run_dir: PathLike, task_class: Optional[type] = None) -> Optional[Path]:
    """The checkpoint a run resumes from: the newest of ``weights/last.ckpt`` and
    ``weights/best.ckpt`` that loads and passes :func:`check_checkpoint_payload`.

    Newest is by training progress recorded inside (global step, then epoch), not by file time
    (a copy changes that); on a tie ``last.ckpt`` wins. A file that does not load (a kill while
    the first ``last.ckpt`` was written, a full disk) is skipped with a warning.

    Args:
        run_dir: the run folder.
        task_class: the task the run asks for (a checkpoint of another task is skipped).

    Returns:
        The checkpoint's path, or None when the run has no complete checkpoint.
    """
    found = []
    for rank, name in enumerate(CHECKPOINT_NAMES):
        path = Path(run_dir) / "weights" / name
        if not path.is_file():
            continue
        try:
            payload = load_checkpoint(path, task_class)
        except ConfigError as err:
            warnings.warn(f"skipping {path}: {err}", stacklevel=2)
            continue
        progress = (int(payload.get("global_step", -1)), int(payload.get("epoch", -1)), -rank)
        found.append((progress, path))
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------ SLURM
def slurm_job_id(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """The SLURM job (``ARRAYJOB_TASK`` for an array task) this process runs in, or None."""
    array_job = env.get("SLURM_ARRAY_JOB_ID")
    if array_job and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def requeued_run_dir(save_dir: PathLike, name: str, job_id: str) -> Optional[Path]:
    """The run folder that SLURM job ``job_id`` trained in before it was requeued (the folder
    whose ``slurm_job`` file names it), or None."""
    for folder in run_folders(save_dir, name):
        marker = folder / SLURM_JOB_FILE
        try:
            if marker.is_file() and marker.read_text().strip() == job_id:
                return folder
        except OSError:
            continue
    return None
