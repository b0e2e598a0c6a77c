"""The command line of an operator process run on this machine (dev up --operator, the demo, tests)."""

from __future__ import annotations

import sys

# names the chart gives these objects for a release called "kvtier"
CHART_TLS_SECRET = "kvtier-webhook-tls"
CHART_WEBHOOK_CONFIG = "kvtier-inject"
CHART_WEBHOOK_SERVICE = "kvtier-webhook"


def operator_argv(
    namespace: str = "kvtier-system",
    webhook_port: int = 0,
    *,
    cert: str | None = None,
    key: str | None = None,
    self_managed: bool = False,
    liveness: str = "",
) -> list[str]:
    """`kvtier operator` with the webhook on 127.0.0.1:webhook_port (0: no webhook), using the given
    certificate files, or certificates it manages itself for the chart's objects."""
    argv = [sys.executable, "-m", "kvtier.cli", "operator", "--namespace", namespace, "--liveness", liveness]
    if webhook_port:
        argv += ["--webhook-port", str(webhook_port), "--webhook-host", "127.0.0.1"]
        if cert and key:
            argv += ["--webhook-cert", cert, "--webhook-key", key]
        if self_managed:
            argv += [
                "--webhook-tls-secret", CHART_TLS_SECRET,
                "--webhook-config", CHART_WEBHOOK_CONFIG,
                "--webhook-service", CHART_WEBHOOK_SERVICE,
            ]  # fmt: skip
    return argv
