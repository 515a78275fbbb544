"""`trainpilot operator`: run the handlers with kopf, logged in like kubectl."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    import trainpilot.controller.handlers  # noqa: F401  (registers the handlers)
    from trainpilot.runtime.kubernetes.api import NoCluster, client_configuration

    try:
        client_configuration()  # the same login the handlers make: fail here, once, with what to do
    except NoCluster as error:
        print(f"trainpilot operator: {error}", file=sys.stderr)
        return 2

    from trainpilot.controller import logs

    logs.configure(args.log_format, args.verbose)
    if args.prometheus_url:
        from trainpilot.runtime import prometheus

        os.environ[prometheus.ENV_URL] = args.prometheus_url  # each experiment's runtime reads it there
    if args.metrics_port:
        from trainpilot.controller import metrics

        metrics.serve(args.metrics_port)
    namespaces = list(args.namespace)
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=args.liveness or None,
            standalone=args.standalone,
        )
    )
    return 0
