"""Domain errors of the transport-free core.

Each kind names the gRPC status it becomes; the servicer maps them in one place. The message is
meant for the caller: it says what was wrong and what to change, and never carries internals.
"""


class ServiceError(Exception):
    """Base of the errors a caller can act on."""


class InvalidArgument(ServiceError):
    """The request is malformed or out of bounds."""


class NotFound(ServiceError):
    """The named classifier does not exist."""


class AlreadyExists(ServiceError):
    """The classifier to create exists already."""


class FailedPrecondition(ServiceError):
    """The request is valid but the classifier is not in a state to serve it."""


class ResourceExhausted(ServiceError):
    """A limit is reached; the message names it."""


class Unavailable(ServiceError):
    """A dependency (the embedder or the store) cannot be reached; retrying later may help."""


class Aborted(ServiceError):
    """A concurrent change conflicts with the request; re-read and retry."""


class DeadlineExceeded(ServiceError):
    """The work could not finish within the caller's deadline."""


class StartupError(Exception):
    """The service cannot start as configured; the message says what to change."""
