"""Block transports between agents: one interface (`base.Transport`), one file per implementation."""

from __future__ import annotations

import logging

from kvtier.agent.transports.base import Transport

log = logging.getLogger("kvtier.agent.transports")


def choose_transport(wanted: str, secret: bytes) -> Transport:
    """`auto` and `rdma` would pick RDMA where a device and pyverbs exist; until its verbs data path
    has run on hardware, every pool moves blocks over TCP and says why when RDMA was asked for."""
    from kvtier.agent.transports import rdma
    from kvtier.agent.transports.tcp import TcpTransport

    if wanted == "rdma":
        reason = rdma.unavailable_reason() or "the RDMA READ data path is not implemented yet"
        log.warning("transport rdma asked for, using tcp: %s", reason)
    return TcpTransport(secret)
