"""`kvtier sidecar`: the prefetch sidecar injected next to an engine.

It takes hints — a key chain, or token ids (hashed with the pool's block size) plus the layout
fingerprint, with an optional deadline — on a local HTTP endpoint, from the engine's connector or
anything upstream that knows a session is about to return (a gateway, a chat frontend), and asks its
node's agent (through the socket the CSI driver delivered) to make those blocks hit DRAM: promote
from NVMe, fetch from peer agents. Work past the deadline is abandoned and counted late.

    POST /v1/hints  {"fingerprint": "...", "token_ids": [...] | "keys": ["hex", ...], "deadline_ms": 2000}
    GET  /healthz   200 once the agent answers (the native sidecar's startup probe)
    GET  /metrics   Prometheus
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvtier.agent.client import CONNECTION_LOST, AgentConnection, Client
from kvtier.agent.keys import block_keys
from prometheus_client import CollectorRegistry, Counter, generate_latest

log = logging.getLogger("kvtier.sidecar")
MAX_BODY = 8 << 20


class Sidecar:
    def __init__(self, socket_path: str, default_deadline: float = 2.0) -> None:
        self.socket_path = socket_path
        self.default_deadline = default_deadline
        self.conn = AgentConnection(socket_path, timeout=30)
        r = self.registry = CollectorRegistry()
        self.hints = Counter("kvtier_sidecar_hints", "Prefetch hints received", ["result"], registry=r)
        self.blocks = Counter("kvtier_sidecar_blocks", "Blocks made to hit DRAM", ["how"], registry=r)
        self.bytes = Counter("kvtier_sidecar_prefetched_bytes", "Bytes fetched from peers", registry=r)
        self.late = Counter("kvtier_sidecar_late", "Hints not done by their deadline", registry=r)

    def client(self) -> Client:
        client = self.conn.get()
        if client is None:
            raise ConnectionError(f"no agent at {self.socket_path}")
        return client

    def healthy(self) -> bool:
        try:
            self.client().call("ping")
            return True
        except CONNECTION_LOST as exc:
            self.conn.lost(exc)
            return False

    def hint(self, body: dict) -> dict:
        fingerprint = body.get("fingerprint")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("'fingerprint' is required")
        client = self.client()
        if "keys" in body:
            keys = [bytes.fromhex(k) for k in body["keys"]]
        elif "token_ids" in body:
            keys = block_keys(list(body["token_ids"]), client.block_tokens, body.get("extra"))
        else:
            raise ValueError("give 'keys' (hex) or 'token_ids'")
        deadline = float(body.get("deadline_ms", self.default_deadline * 1000)) / 1000
        t0 = time.monotonic()
        result = client.call(  # Client serializes calls on its connection
            "prefetch", fingerprint=fingerprint, keys=[k.hex() for k in keys], deadline=deadline
        )["result"]
        result["seconds"] = round(time.monotonic() - t0, 4)
        self.hints.labels("late" if result.get("late") else "done").inc()
        self.blocks.labels("promoted").inc(result.get("promoted", 0))
        self.blocks.labels("fetched").inc(result.get("fetched", 0))
        self.blocks.labels("already_in_dram").inc(result.get("dram", 0))
        self.bytes.inc(result.get("fetchedBytes", 0))
        if result.get("late"):
            self.late.inc()
        return result


def make_handler(sidecar: Sidecar):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args) -> None:
            log.debug(fmt, *args)

        def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                ok = sidecar.healthy()
                self._send(200 if ok else 503, b"ok" if ok else b"agent not reachable", "text/plain")
            elif self.path == "/metrics":
                self._send(200, generate_latest(sidecar.registry), "text/plain; version=0.0.4")
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self) -> None:
            if self.path != "/v1/hints":
                self._send(404, b'{"error": "not found"}')
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                self._send(413, b'{"error": "body missing or too large"}')
                return
            try:
                result = sidecar.hint(json.loads(self.rfile.read(length)))
            except (ValueError, TypeError, KeyError) as exc:
                sidecar.hints.labels("invalid").inc()
                self._send(400, json.dumps({"error": str(exc)}).encode())
                return
            except CONNECTION_LOST as exc:
                sidecar.conn.lost(exc)  # the next hint connects again
                sidecar.hints.labels("agent_down").inc()
                self._send(503, json.dumps({"error": f"agent not reachable: {exc}"}).encode())
                return
            self._send(200, json.dumps(result).encode())

    return Handler


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=os.environ.get("KVTIER_LOG", "INFO"), format="%(asctime)s %(name)s %(message)s")
    sidecar = Sidecar(args.socket, args.deadline)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(sidecar))
    print(
        f"kvtier sidecar ready pool={args.pool} http={server.server_address[0]}:{server.server_address[1]}",
        flush=True,
    )
    server.serve_forever()
    return 0
