"""sagabox's orchestrator: saga definitions, the pure machine, and the engine that
applies it in one PostgreSQL transaction per batch of events."""

from orchestrator.definition import Parallel, Ref, Retry, Saga, Step, data, result
from orchestrator.engine import Orchestrator, Outcome, SagaView
from orchestrator.errors import (
    DefinitionError,
    IdempotencyConflictError,
    InvalidInputError,
    OperatorActionError,
    OrchestratorError,
    StoreError,
    UnknownSagaError,
    WaitTimeoutError,
)
from orchestrator.machine import Command, Transition, start, transition
from orchestrator.registry import Registry
from orchestrator.starts import StartPublisher
from orchestrator.state import SagaState, SagaStatus, StepState, StepStatus
from orchestrator.store import make_engine
from orchestrator.waiting import SagaWaiter, WaitMark

__all__ = [
    "Command",
    "DefinitionError",
    "IdempotencyConflictError",
    "InvalidInputError",
    "OperatorActionError",
    "Orchestrator",
    "OrchestratorError",
    "Outcome",
    "Parallel",
    "Ref",
    "Registry",
    "Retry",
    "Saga",
    "SagaState",
    "SagaStatus",
    "SagaView",
    "SagaWaiter",
    "StartPublisher",
    "Step",
    "StepState",
    "StepStatus",
    "StoreError",
    "Transition",
    "UnknownSagaError",
    "WaitMark",
    "WaitTimeoutError",
    "data",
    "make_engine",
    "result",
    "start",
    "transition",
]
