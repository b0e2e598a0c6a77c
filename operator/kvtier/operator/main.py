"""`kvtier operator`: runs the kopf operator (and, with --webhook-port, the pod webhook)."""

from __future__ import annotations

import argparse
import logging
import os


def main(args: argparse.Namespace) -> int:
    os.environ["KVTIER_NAMESPACE"] = args.namespace
    import kopf
    from kvtier.operator import reconcile  # (registers the handlers)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.webhook_port:
        os.environ["KVTIER_WEBHOOK_ON_REFUSAL"] = args.webhook_on_refusal
        from kvtier.operator import admission  # noqa: F401  (registers the pod webhook)

        @kopf.on.startup()
        def webhook_server(settings: kopf.OperatorSettings, **_: object) -> None:
            # The MutatingWebhookConfiguration comes from the chart (or the test): not managed here.
            settings.admission.server = kopf.WebhookServer(
                addr=args.webhook_host,
                port=args.webhook_port,
                certfile=args.webhook_cert,
                pkeyfile=args.webhook_key,
            )

    del reconcile
    kopf.run(
        clusterwide=True,
        standalone=True,  # one replica (Recreate); no peering objects
        liveness_endpoint=args.liveness or None,
    )
    return 0
