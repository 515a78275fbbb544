"""`trainpilot operator`: run the handlers with kopf, logged in like kubectl."""

from __future__ import annotations

import argparse
import asyncio
import logging


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    import trainpilot.controller.handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
