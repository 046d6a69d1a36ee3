class OrthrusInputError(ValueError):
    """Invalid user input. The message starts with the offending field's name."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self):  # picklable, so it crosses process boundaries (Ray) intact
        return type(self), (self.field, self.problem)


class EngineOverloaded(RuntimeError):
    """The engine's waiting queue is full (EngineArgs.max_waiting_requests): retry later. A server
    maps it to HTTP 429 / gRPC RESOURCE_EXHAUSTED."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped: this engine takes no more requests."""
