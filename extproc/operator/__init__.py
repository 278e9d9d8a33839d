"""The Kubernetes operator (`tollgate operator`): custom resources in, Redis configuration out,
live state written back into each resource's `status`.

Only this package imports kopf and the Kubernetes client; everything it decides is done by the
same code `tollgate apply` uses (`validate_document`, `Store.apply`/`Store.delete`) and the same
readers `tollgate get` uses (`extproc.store.live_state`).
"""
