"""Kubernetes object names, checked before they reach an API path, a socket folder or a log."""

from __future__ import annotations

import re

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # namespaces
DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_label(name: str) -> bool:
    return bool(DNS_LABEL.match(name))


def is_subdomain(name: str) -> bool:
    """Most object names (pools, Secrets): lowercase letters, digits, '-' and '.', at most 253."""
    return bool(DNS_SUBDOMAIN.match(name))
