"""Failpoints: named places where a test can make a process die, fail or stall.

A failpoint is a no-op unless ``SAGABOX_FAILPOINTS`` names it, for instance
``SAGABOX_FAILPOINTS="relay.after_confirm_before_mark=exit"``. Several are
separated by commas or semicolons. Actions:

- ``exit``: ``os._exit(137)``, like ``kill -9`` (no cleanup, no flush);
- ``raise``: raise RelayError at that point;
- ``sleep:SECONDS``: block the process for that long.

The variable is read by ``Failpoints.from_env()`` at the entry point, never at
import, and the object is passed down like any other setting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from outbox_relay.errors import ConfigurationError, RelayError

VARIABLE = "SAGABOX_FAILPOINTS"
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL


@dataclass(frozen=True, slots=True)
class Failpoints:
    """The failpoints that are armed in this process: name -> action."""

    actions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Failpoints:
        value = (os.environ if environ is None else environ).get(VARIABLE, "")
        return cls.parse(value)

    @classmethod
    def parse(cls, value: str) -> Failpoints:
        actions: dict[str, str] = {}
        for item in value.replace(";", ",").split(","):
            if not item.strip():
                continue
            name, sep, action = item.partition("=")
            action = action.strip()
            if not sep or not name.strip() or not _valid_action(action):
                raise ConfigurationError(
                    f"{VARIABLE}: expected name=exit|raise|sleep:SECONDS, got {item.strip()!r}"
                )
            actions[name.strip()] = action
        return cls(MappingProxyType(actions))

    def failpoint(self, name: str) -> None:
        """Run the action armed for ``name``, if any; otherwise do nothing."""
        action = self.actions.get(name)
        if action is None:
            return
        if action == "exit":
            os._exit(EXIT_CODE)
        if action == "raise":
            raise RelayError(f"failpoint {name} raised")
        time.sleep(float(action.removeprefix("sleep:")))

    __call__ = failpoint


def _valid_action(action: str) -> bool:
    if action in {"exit", "raise"}:
        return True
    if not action.startswith("sleep:"):
        return False
    try:
        return float(action.removeprefix("sleep:")) >= 0
    except ValueError:
        return False


NO_FAILPOINTS = Failpoints()
