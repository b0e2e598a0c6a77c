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


def install_chart_with_local_operator(cp, log=print, extra_env: dict[str, str] | None = None) -> None:
    """`helm install` the chart into a local control plane with its webhook pointed at an operator
    process started here (self-managed certificates); the operator lives as long as the control plane."""
    import subprocess

    from kvtier.dev.ports import free_port
    from kvtier.dev.tools import repo_root

    port = free_port()
    log(f"helm install kvtier charts/kvtier -n kvtier-system (webhook -> https://127.0.0.1:{port})")
    subprocess.run(
        [
            str(cp.bin_dir / "helm"), "install", "kvtier", str(repo_root() / "charts" / "kvtier"),
            "-n", "kvtier-system", "--create-namespace", "--set", f"webhook.url=https://127.0.0.1:{port}/kvtier-inject",
        ],
        env=cp.env(), check=True, capture_output=True, text=True,
    )  # fmt: skip
    log("starting the operator (its log: operator.log in the control plane's folder)")
    cp.spawn_managed(
        "operator",
        operator_argv(webhook_port=port, self_managed=True, liveness="http://127.0.0.1:0/healthz"),
        {**cp.env(), **(extra_env or {})},
    )
