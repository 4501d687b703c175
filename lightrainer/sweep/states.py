"""Which trials count toward ``--trials``, and which were killed: small pure decisions over a
study's trials (see :mod:`lightrainer.sweep`)."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence


def state_of(trial: Any) -> str:
    """A trial's state as the results table writes it: complete, pruned, failed, interrupted,
    skipped (a trial started past ``--trials`` by a concurrent machine), running, waiting."""
    name = trial.state.name
    attrs = trial.user_attrs
    if name == "FAIL":
        return "interrupted" if attrs.get("interrupted") else "skipped" if attrs.get("surplus") else "failed"
    return {"COMPLETE": "complete", "PRUNED": "pruned", "RUNNING": "running", "WAITING": "waiting"}.get(name, name.lower())


def counts_toward(trial: Any) -> bool:
    """Whether a trial counts toward ``--trials`` (a pure decision, see the module's docstring)."""
    return state_of(trial) in ("complete", "pruned", "failed", "running")


def dead_trials(trials: Sequence[Any], host: str, is_alive: Callable[[int], bool]) -> list[Any]:
    """The running trials whose process on ``host`` is gone (killed): a pure decision."""
    return [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("host") == host
            and isinstance(t.user_attrs.get("pid"), int) and not is_alive(t.user_attrs["pid"])]


def reruns_needed(trials: Sequence[Any]) -> list[Any]:
    """The interrupted trials no later trial runs again yet."""
    rerun = {t.user_attrs.get("rerun_of") for t in trials}
    return [t for t in trials if state_of(t) == "interrupted" and t.number not in rerun]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
