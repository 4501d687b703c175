"""Registries: every name a user can write in a YAML lives in exactly one of these.

Optimizers, lr schedules, calibration methods, quantization backends, export formats and tasks are
each a :class:`Registry`. The module that implements an entry registers it (``OPTIMIZERS.register
("SGD", build_sgd)``); importing :mod:`lightrainer` imports every built-in one, and the config
validates a name by asking the registry at validation time, so an entry registered from outside
the package (a user's optimizer, calibration method or task) is accepted in a YAML like a built-in.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from lightrainer.errors import ConfigError, closest_hint

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> entries, looked up case-insensitively (the spelling registered is canonical).

    Args:
        kind: what an entry is, for messages ("optimizer").
        key: the YAML key that names an entry, for messages ("optimizer"; default ``kind``).
    """

    def __init__(self, kind: str, key: str | None = None) -> None:
        self.kind = kind
        self.key = key or kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, override: bool = False) -> Any:
        """Add ``entry`` under ``name``; without ``entry``, a decorator that registers its argument.

        Raises:
            ValueError: ``name`` is taken (case-insensitively) by another entry and not ``override``.
        """
        if entry is None:
            def decorator(obj: T) -> T:
                self.register(name, obj, override=override)
                return obj

            return decorator
        taken = self._find(name)
        if taken is not None and self._entries[taken] is not entry and not override:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass override=True to replace it")
        if taken is not None:
            del self._entries[taken]
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and plugins that clean up after themselves)."""
        taken = self._find(name)
        if taken is not None:
            del self._entries[taken]

    def _find(self, name: str) -> str | None:
        if name in self._entries:
            return name
        lower = str(name).lower()
        return next((k for k in self._entries if k.lower() == lower), None)

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def canonical(self, name: Any, key: str | None = None, extra: tuple[str, ...] = ()) -> str:
        """The registered spelling of ``name`` (or one of ``extra``, e.g. "auto").

        Raises:
            ConfigError: no such entry; names the key, the choices and the closest one.
        """
        text = str(name)
        for special in extra:
            if text.lower() == special.lower():
                return special
        found = self._find(text)
        if found is None:
            choices = [*extra, *self._entries]
            raise ConfigError(
                f"{key or self.key}: {name!r} is not one of {', '.join(choices)}" + closest_hint(text, choices)
            )
        return found

    def get(self, name: str, key: str | None = None) -> T:
        """The entry registered under ``name``.

        Raises:
            ConfigError: no such entry (see :meth:`canonical`).
        """
        return self._entries[self.canonical(name, key)]

    def validator(self, extra: tuple[str, ...] = ()) -> Callable[[str, Any], str]:
        """A config check: ``check(key, value)`` -> the canonical name, asking the registry each time."""

        def check(key: str, value: Any) -> str:
            return self.canonical(value, key, extra)

        return check


#: name -> builder(param_groups, lr, momentum, **kernel) (:mod:`lightrainer.optim`).
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer")
#: name -> factory(cfg) -> lf(epoch) (:mod:`lightrainer.optim`).
SCHEDULES: Registry[Callable[..., Any]] = Registry("lr schedule", key="scheduler")
#: name -> CalibMethod (:mod:`lightrainer.quant.calibrate`).
CALIBRATION_METHODS: Registry[Any] = Registry("calibration method", key="method")
#: name -> QuantBackend (:mod:`lightrainer.quant`).
QUANT_BACKENDS: Registry[Any] = Registry("quantization backend", key="quant_backend")
#: name -> ExportFormat (:mod:`lightrainer.export.pipeline`).
EXPORT_FORMATS: Registry[Any] = Registry("export format", key="export")
#: task name -> LightrainerModule subclass (every subclass registers itself when defined).
TASKS: Registry[type] = Registry("task")
