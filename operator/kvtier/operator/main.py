"""`kvtier operator`: runs the kopf operator (and, with --webhook-port, the pod webhook)."""

from __future__ import annotations

import argparse
import logging
import os


def main(args: argparse.Namespace) -> int:
    os.environ["KVTIER_NAMESPACE"] = args.namespace
    import kopf
    from kvtier.operator import reconcile  # noqa: F401  (registers the handlers)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    kopf.run(
        clusterwide=True,
        standalone=True,  # one replica (Recreate); no peering objects
        liveness_endpoint=args.liveness or None,
    )
    return 0
