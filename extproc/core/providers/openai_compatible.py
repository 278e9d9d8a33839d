"""OpenAI-compatible servers (vLLM, Ollama, LiteLLM, another Tollgate, ...): OpenAI's dialect
and routes, no paths of their own and no public host (each Upstream names its own cluster)."""

from __future__ import annotations

from extproc.core.providers.base import Cluster, Endpoint, Route
from extproc.core.providers.openai import OpenAIDialect


class OpenAICompatible(OpenAIDialect):
    name = "openai-compatible"
    endpoints: frozenset[Endpoint] = frozenset()  # OpenAI's
    cluster: Cluster | None = None

    def classify(self, path: str) -> Route | None:
        return None  # the paths are OpenAI's


PROVIDER = OpenAICompatible()
