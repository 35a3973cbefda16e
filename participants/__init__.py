"""The participants SDK: command handlers on dramatiq, applied at most once.

    from participants import BusinessFailure, Context, Participant

    inventory = Participant("inventory")

    @inventory.command("reserve_stock", compensation="release_stock")
    def reserve(session, payload, ctx: Context) -> dict: ...

    @inventory.compensation("release_stock")
    def release(session, payload, ctx: Context) -> None: ...

Modules: ``participant`` (declaring), ``handling`` (one transaction per message),
``inbox`` + ``store`` (the idempotency inbox; every SQL statement is in ``store``),
``replies``, ``middleware`` + ``broker`` + ``worker`` (dramatiq), ``testing``
(in-memory doubles), ``examples`` (one module per example service).
Guarantees: docs/participants.md.
"""

from __future__ import annotations

from participants.context import Context, Payload
from participants.errors import BusinessFailure, DefinitionError, ParticipantError
from participants.participant import Participant
from participants.store import purge_inbox

__all__ = [
    "BusinessFailure",
    "Context",
    "DefinitionError",
    "Participant",
    "ParticipantError",
    "Payload",
    "purge_inbox",
]
