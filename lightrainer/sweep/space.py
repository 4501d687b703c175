"""The space of a sweep: each key with its distribution (:class:`KeySpace`), and the whole
(:class:`Space`). Plain validated data; :mod:`lightrainer.sweep.space_file` reads it from a file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightrainer.config import ConfigError


@dataclass(frozen=True)
class KeySpace:
    """One key of a sweep and its distribution.

    Attributes:
        key: a flat key (``lr0``) or a section path (``model.init_args.net.init_args.width``).
        kind: "float", "int" or "categorical".
        low, high, log, step: the range (float and int).
        choices: the values (categorical), each already validated and in its canonical spelling.
    """

    key: str
    kind: str
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        """The value of this key for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a value this key may take (a baseline trial runs it)."""
        if self.kind == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        on_step = self.step is None or math.isclose((value - self.low) / self.step, round((value - self.low) / self.step))
        return self.low <= value <= self.high and on_step

    def grid(self) -> list[Any]:
        """The values a grid search tries.

        Raises:
            ConfigError: a float range without a step (a grid needs a finite set).
        """
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "float" and self.step is None:
            raise ConfigError(
                f"sampler grid: {self.key} is a range without a step; give a list of values or a step "
                f"({self.key}: {{low: {self.low:g}, high: {self.high:g}, step: ...}})"
            )
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        return [self.low + i * step if self.kind == "int" else round(self.low + i * step, 12) for i in range(count)]

    def to_data(self) -> Any:
        """The entry as a space file writes it."""
        if self.kind == "categorical":
            return list(self.choices)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class Space:
    """A validated space: the keys to tune and the sweep's settings (None: the default)."""

    keys: tuple[KeySpace, ...]
    sampler: str | None = None
    pruner: str | None = None

    def names(self) -> list[str]:
        return [k.key for k in self.keys]

    def to_data(self) -> dict[str, Any]:
        """The space as plain data (``space.yaml``; compared on ``--resume``)."""
        return {k.key: k.to_data() for k in self.keys}

    def grid_size(self) -> int:
        return math.prod(len(k.grid()) for k in self.keys)
