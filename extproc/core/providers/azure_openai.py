"""Azure OpenAI: OpenAI's dialect on `/openai/deployments/<deployment>/<operation>` paths,
authenticated with `api-key`.

Azure SDK clients (`openai.AzureOpenAI` pointed at the gateway) send the deployment paths and
keep them; an OpenAI-style `/v1` call for chat/completions/embeddings routed to Azure is
rewritten into that form (deployment from `azure.deployments`, else the model name). The api
version is the Upstream's `azure.apiVersion` unless the client's path has one.
"""

from __future__ import annotations

from extproc.core.providers.base import Cluster, Endpoint, RewriteInput, Route
from extproc.core.providers.openai import SUFFIXES, OpenAIDialect

DEFAULT_API_VERSION = "2024-10-21"
# The /v1 calls that have an Azure deployment path to be rewritten to.
REWRITABLE = {Endpoint.CHAT: "chat/completions", Endpoint.COMPLETIONS: "completions",
              Endpoint.EMBEDDINGS: "embeddings"}
_PREFIX = "/openai/deployments/"


class AzureOpenAI(OpenAIDialect):
    name = "azure-openai"
    auth_header = "api-key"
    #: The host is each operator's own resource (`tollgate up --azure-host`): a placeholder.
    endpoints: frozenset[Endpoint] = frozenset()  # OpenAI's
    cluster: Cluster | None = Cluster("azure-openai", "YOUR-RESOURCE.openai.azure.com")

    def classify(self, path: str) -> Route | None:
        if not path.startswith(_PREFIX):
            return None
        deployment, _, operation = path[len(_PREFIX):].partition("/")
        endpoint = SUFFIXES.get(operation)
        if deployment and endpoint:
            return Route(endpoint, azure_deployment=deployment)
        return None

    def serves(self, route: Route) -> bool:
        # Plain /v1 calls reach Azure only where the path can be rewritten.
        return route.azure_deployment is not None or route.endpoint in REWRITABLE

    def auth_value(self, secret: str) -> str:
        return secret

    def rewrite(self, req: RewriteInput) -> list[tuple[str, str]]:
        version = req.upstream.azure_api_version or DEFAULT_API_VERSION
        if req.route.azure_deployment is not None:
            if "api-version=" in req.path:
                return []
            joiner = "&" if "?" in req.path else "?"
            return [(":path", f"{req.path}{joiner}api-version={version}")]
        deployment = req.upstream.azure_deployments.get(req.model, req.model)
        operation = REWRITABLE[req.route.endpoint]
        return [(":path", f"{_PREFIX}{deployment}/{operation}?api-version={version}")]


PROVIDER = AzureOpenAI()
