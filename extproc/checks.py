"""Configuration problems worth a warning before they cost a user a 503: Upstreams whose
credential secrets cannot be found, and Upstreams naming an Envoy cluster the shipped Envoy
configuration does not define. Used by `tollgate apply` (and `--dry-run`) and `tollgate up`."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from extproc.core.resources import Resource

SecretLookup = Callable[[str], str | None]


def credential_warnings(resources: Iterable[Resource], lookup: SecretLookup,
                        where: str) -> list[str]:
    """One line per Upstream with credentials whose secret `lookup` cannot find. `where` says
    where secrets were looked for (environment, secrets folder)."""
    out = []
    for r in resources:
        if r.kind != "Upstream":
            continue
        creds = r.spec.get("credentials") or []
        missing = [c["secretRef"] for c in creds if not lookup(c["secretRef"])]
        models = ",".join(r.spec.get("models") or ["*"])
        if not creds:
            out.append(f"upstream {r.name!r} has no credentials: only requests that bring "
                       "their own provider key (xProxy-Api-Key) can use it")
        elif len(missing) == len(creds):
            out.append(f"upstream {r.name!r} has no credential: {', '.join(missing)} not found "
                       f"in {where}; calls for models {models} get 503 until it is set")
        elif missing:
            out.append(f"upstream {r.name!r}: secret(s) {', '.join(missing)} not found in "
                       f"{where}; those credentials are skipped")
    return out


def cluster_warnings(resources: Iterable[Resource], known: Collection[str]) -> list[str]:
    """One line per Upstream naming a cluster outside `known` (the generated configuration's:
    `envoyconf.known_clusters`). `tollgate apply` and the operator refuse such an Upstream
    unless told otherwise: Envoy would answer its calls with a bare 503."""
    return [
        f"upstream {r.name!r} uses Envoy cluster {r.spec['cluster']!r}, which the generated "
        f"Envoy configuration does not define (it has {', '.join(sorted(known))}); define it "
        f"with TOLLGATE_ENVOY_CLUSTERS={r.spec['cluster']}=http://HOST:PORT (read by the "
        "Envoy config generator and by this check) or give its credentials a baseUrl"
        for r in resources
        if r.kind == "Upstream" and r.spec["cluster"] not in known
    ]
