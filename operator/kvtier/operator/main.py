"""`kvtier operator`: runs the kopf operator (and, with --webhook-port, the pod webhook)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kvtier import logs
from kvtier.operator.settings import OperatorSettings


def main(args: argparse.Namespace) -> int:
    logs.setup(args)
    # Read once, here; handlers get it as kopf's memo.settings.
    settings = OperatorSettings.from_environment(
        namespace=args.namespace, webhook_on_refusal=args.webhook_on_refusal
    )
    import kopf

    from kvtier.operator import reconcile  # (registers the handlers)

    reconcile.register(settings)
    if args.webhook_port:
        from kvtier.operator import admission  # noqa: F401  (registers the pod webhook)

        @kopf.on.startup()
        def webhook_server(settings: kopf.OperatorSettings, **_: object) -> None:  # kopf's own settings
            # The MutatingWebhookConfiguration comes from the chart (or the test): not managed here.
            certfile, pkeyfile = args.webhook_cert, args.webhook_key
            if args.webhook_tls_secret:
                from kvtier.operator.certificates import ensure_webhook_tls, patch_ca_bundle
                from kvtier.operator.kube import api_client

                folder = Path(tempfile.mkdtemp(prefix="kvtier-webhook-"))
                cert, key, ca = ensure_webhook_tls(
                    api_client(), args.namespace, args.webhook_tls_secret, args.webhook_service, folder
                )
                certfile, pkeyfile = str(cert), str(key)
                if args.webhook_config:
                    patch_ca_bundle(api_client(), args.webhook_config, ca)
            settings.admission.server = kopf.WebhookServer(
                addr=args.webhook_host,
                port=args.webhook_port,
                certfile=certfile,
                pkeyfile=pkeyfile,
            )

    kopf.run(
        memo=kopf.Memo(settings=settings),
        clusterwide=True,
        standalone=True,  # one replica (Recreate); no peering objects
        liveness_endpoint=args.liveness or None,
    )
    return 0
