"""Service settings: one pydantic-settings class (:class:`Settings`), environment prefix ``KNN_``.

Nested sections use ``__``: ``KNN_EMBEDDING__BASE_URL``, ``KNN_STORE__URL``. Lists take JSON or a
comma-separated string: ``KNN_DIMENSIONS=256,1024``. Tests pass values to the constructor.

The sections live in modules by what they configure; import them from here.
"""

from .embedding import QWEN3_TEMPLATE, EmbeddingSettings
from .limits import ClassifierDefaults, LimitSettings
from .listener import AuthSettings, ServerSettings, TlsSettings, host_port
from .observability import MetricsSettings, TracingSettings
from .root import Settings
from .store import StoreSettings

__all__ = [
    "QWEN3_TEMPLATE",
    "AuthSettings",
    "ClassifierDefaults",
    "EmbeddingSettings",
    "LimitSettings",
    "MetricsSettings",
    "ServerSettings",
    "Settings",
    "StoreSettings",
    "TlsSettings",
    "TracingSettings",
    "host_port",
]
