"""Saga definitions by (name, version). New sagas start on the latest version;
running instances keep the version they started with."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from orchestrator.definition import Saga
from orchestrator.errors import DefinitionError, UnknownSagaError
from orchestrator.validation import validate


class Registry:
    """Validates definitions on ``register`` and finds them by name and version."""

    def __init__(self, sagas: Iterable[Saga] = ()) -> None:
        self._sagas: dict[tuple[str, int], Saga] = {}
        for saga in sagas:
            self.register(saga)

    def register(self, saga: Saga) -> Saga:
        validate(saga)
        key = (saga.name, saga.version)
        if key in self._sagas and self._sagas[key] != saga:
            raise DefinitionError(saga.name, [f"version {saga.version} is already registered"])
        self._sagas[key] = saga
        return saga

    def get(self, name: str, version: int | None = None) -> Saga:
        """The definition ``name`` at ``version``, or its latest version when None."""
        if version is None:
            versions = [v for (n, v) in self._sagas if n == name]
            if not versions:
                raise UnknownSagaError(f"no saga named {name!r} is registered")
            version = max(versions)
        try:
            return self._sagas[(name, version)]
        except KeyError:
            known = sorted(v for (n, v) in self._sagas if n == name)
            raise UnknownSagaError(
                f"saga {name!r} has no version {version} (registered: {known or 'none'})"
            ) from None

    def __contains__(self, key: object) -> bool:
        """Whether ``(name, version)`` is registered."""
        return key in self._sagas

    def __iter__(self) -> Iterator[Saga]:
        return iter(sorted(self._sagas.values(), key=lambda s: (s.name, s.version)))

    def __len__(self) -> int:
        return len(self._sagas)
