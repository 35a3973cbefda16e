"""Failpoints: named places where a test can make a process die, fail or stall.

A failpoint is a no-op unless ``SAGABOX_FAILPOINTS`` names it, for instance
``SAGABOX_FAILPOINTS="relay.after_confirm_before_mark=exit"``. Several are
separated by commas or semicolons. Actions:

- ``exit``: ``os._exit(137)``, like ``kill -9`` (no cleanup, no flush);
- ``raise``: raise the process's failpoint error at that point (RelayError unless the
  entry point chose another: the orchestrator raises a broker error, so ``raise``
  there plays a lost connection);
- ``sleep:SECONDS``: block the calling thread for that long.

An action may end with ``@P`` (0 < P <= 1): it then fires on each pass with
probability P, drawn from a generator seeded by ``SAGABOX_FAILPOINTS_SEED`` (random
when unset), so ``exit@0.2`` kills some runs part-way and a seed replays the draws
(in a process with several threads, only as far as their order repeats).

The variables are read by ``Failpoints.from_env()`` at the entry point, never at
import, and the object is passed down like any other setting.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from outbox_relay.errors import ConfigurationError, RelayError

VARIABLE = "SAGABOX_FAILPOINTS"
SEED_VARIABLE = "SAGABOX_FAILPOINTS_SEED"
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL

#: Every failpoint the sagabox processes pass through, by component.
KNOWN = (
    "relay.after_confirm_before_mark",
    "orchestrator.after_commit_before_ack",
    "participant.before_commit",
    "participant.after_commit_before_ack",
)


@dataclass(frozen=True, slots=True)
class Failpoints:
    """The failpoints that are armed in this process: name -> action (and probability)."""

    actions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    probabilities: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    error: type[Exception] = RelayError
    seed: int | None = None
    _random: random.Random = field(default_factory=random.Random, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, error: type[Exception] = RelayError
    ) -> Failpoints:
        env = os.environ if environ is None else environ
        seed_text = env.get(SEED_VARIABLE, "").strip()
        try:
            seed = int(seed_text) if seed_text else None
        except ValueError:
            raise ConfigurationError(f"{SEED_VARIABLE}: expected an integer") from None
        return cls.parse(env.get(VARIABLE, ""), error=error, seed=seed)

    @classmethod
    def parse(
        cls, value: str, *, error: type[Exception] = RelayError, seed: int | None = None
    ) -> Failpoints:
        actions: dict[str, str] = {}
        probabilities: dict[str, float] = {}
        for item in value.replace(";", ",").split(","):
            if not item.strip():
                continue
            name, sep, spec = item.partition("=")
            action, at, chance = spec.strip().partition("@")
            probability = _probability(chance) if at else 1.0
            if not sep or not name.strip() or not _valid_action(action) or probability is None:
                raise ConfigurationError(
                    f"{VARIABLE}: expected name=exit|raise|sleep:SECONDS[@P], got {item.strip()!r}"
                )
            actions[name.strip()] = action
            if probability < 1.0:
                probabilities[name.strip()] = probability
        return cls(
            MappingProxyType(actions),
            MappingProxyType(probabilities),
            error=error,
            seed=seed,
            _random=random.Random(seed),
        )

    def failpoint(self, name: str) -> None:
        """Run the action armed for ``name``, if any; otherwise do nothing."""
        action = self.actions.get(name)
        if action is None or not self._fires(name):
            return
        if action == "exit":
            os._exit(EXIT_CODE)
        if action == "raise":
            raise self.error(f"failpoint {name} raised")
        time.sleep(float(action.removeprefix("sleep:")))

    __call__ = failpoint

    async def afailpoint(self, name: str) -> None:
        """``failpoint`` for a coroutine: a sleep stalls this task, not the whole loop."""
        action = self.actions.get(name)
        if action is not None and action.startswith("sleep:"):
            if self._fires(name):
                await asyncio.sleep(float(action.removeprefix("sleep:")))
            return
        self.failpoint(name)

    def _fires(self, name: str) -> bool:
        probability = self.probabilities.get(name)
        if probability is None:
            return True
        with self._lock:  # one draw at a time, so a seed gives one sequence
            return self._random.random() < probability


def _valid_action(action: str) -> bool:
    if action in {"exit", "raise"}:
        return True
    if not action.startswith("sleep:"):
        return False
    try:
        return float(action.removeprefix("sleep:")) >= 0
    except ValueError:
        return False


def _probability(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 < value <= 1.0 else None


NO_FAILPOINTS = Failpoints()
