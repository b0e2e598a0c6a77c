"""Self-managed webhook certificates: a CA and a serving certificate kept in a Secret the operator
owns, and the CA patched into the MutatingWebhookConfiguration's caBundle.

Generated once and reused (stable across operator restarts, `helm upgrade` and `helm template`,
which never renders them), renewed when less than 30 days remain.
"""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

from cryptography import x509
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kvtier import certs

RENEW_BEFORE = dt.timedelta(days=30)


def _needs_new(data: dict[str, str] | None, dns_names: tuple[str, ...]) -> bool:
    if not data or not all(k in data for k in ("ca.crt", "tls.crt", "tls.key")):
        return True
    cert = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    expiring = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < RENEW_BEFORE
    return expiring or not set(dns_names) <= set(sans)


def ensure_webhook_tls(
    api: client.ApiClient, namespace: str, secret: str, service: str, folder: Path
) -> tuple[Path, Path, bytes]:
    """(cert file, key file, CA PEM) for the webhook server, creating or renewing the Secret."""
    core = client.CoreV1Api(api)
    dns = (
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    )
    try:
        data = core.read_namespaced_secret(secret, namespace).data
        exists = True
    except ApiException as exc:
        if exc.status != 404:
            raise
        data, exists = None, False
    if _needs_new(data, dns):
        ca = certs.new_ca("kvtier-webhook-ca")
        serving = certs.issue(ca, f"{service}.{namespace}.svc", dns_names=dns, ips=("127.0.0.1",))
        data = {
            "ca.crt": base64.b64encode(ca.cert_pem).decode(),
            "tls.crt": base64.b64encode(serving.cert_pem + ca.cert_pem).decode(),
            "tls.key": base64.b64encode(serving.key_pem).decode(),
        }
        body = {
            "metadata": {"name": secret, "labels": {"app.kubernetes.io/managed-by": "kvtier-operator"}},
            "type": "kubernetes.io/tls",
            "data": data,
        }
        if exists:
            core.replace_namespaced_secret(secret, namespace, body)
        else:
            core.create_namespaced_secret(namespace, body)
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "tls.crt", folder / "tls.key"
    cert.write_bytes(base64.b64decode(data["tls.crt"]))
    key.touch(mode=0o600)
    key.write_bytes(base64.b64decode(data["tls.key"]))
    return cert, key, base64.b64decode(data["ca.crt"])


def patch_ca_bundle(api: client.ApiClient, config_name: str, ca_pem: bytes) -> None:
    adm = client.AdmissionregistrationV1Api(api)
    current = adm.read_mutating_webhook_configuration(config_name)
    bundle = base64.b64encode(ca_pem).decode()
    hooks = [
        {"name": w.name, "clientConfig": {"caBundle": bundle}}
        for w in current.webhooks or []
        if w.client_config.ca_bundle != bundle
    ]
    if hooks:
        adm.patch_mutating_webhook_configuration(config_name, {"webhooks": hooks})
