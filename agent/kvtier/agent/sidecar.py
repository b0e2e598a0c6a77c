"""`kvtier sidecar`: the prefetch sidecar injected next to an engine.

It takes hints — a key chain, or token ids (hashed with the pool's block size) plus the layout
fingerprint, with an optional deadline — from the engine's connector or anything upstream that
knows a session is about to return (a gateway, a chat frontend), and asks its node's agent (through
the socket the CSI driver delivered) to make those blocks hit DRAM: promote from NVMe, fetch from
peer agents. Work past the deadline is abandoned and counted late.

Three listeners, so that only the tenant's own engine learns what is cached:
- hints, on the pod's loopback by default (`--host 127.0.0.1 --port 8765`): only the pod's own
  containers reach it, and its reply says what the agent did (promoted, fetched, already in DRAM);
    POST /v1/hints  {"fingerprint": "...", "token_ids": [...] | "keys": ["hex", ...], "deadline_ms": 2000}
- probes (`--probe-port`, every address): GET /healthz (200 once the agent answers: the native
  sidecar's startup probe, which the kubelet sends to the pod's IP) and GET /metrics (counters);
- a cross-pod hint endpoint for a gateway (`--public-port`, off unless given, with
  `--token-file`): the same POST with `Authorization: Bearer <token>`, answered 202 at once with no
  result, the work done in the background, so neither the reply nor its timing says what is cached.
Every malformed request gets a 4xx with a short reason; bodies, key counts, deadlines and the
fingerprint are bounded.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

from kvtier import logs
from kvtier.agent.api.protocol import AgentError
from kvtier.agent.client import CONNECTION_LOST, AgentConnection, Client
from kvtier.agent.keys import block_keys

log = logging.getLogger("kvtier.sidecar")
MAX_BODY = 8 << 20
MAX_KEYS = 16384
MAX_TOKENS = 4 << 20
MAX_FINGERPRINT = 512
MAX_EXTRA = 1024
MAX_DEADLINE_MS = 60_000
KEY_HEX = 64  # SHA-256 keys
MAX_CONNECTIONS = 64
READ_TIMEOUT = 10.0
PUBLIC_QUEUE = 64


class BadHint(ValueError):
    """A request refused with an HTTP status and a short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Hint:
    fingerprint: str
    deadline: float  # seconds
    keys: tuple[bytes, ...] = ()
    token_ids: tuple[int, ...] = ()
    extra: str | None = None


def parse_hint(raw: bytes, default_deadline: float) -> Hint:
    """A hint body, checked field by field. Pure."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadHint(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadHint(400, "the body must be a JSON object")
    unknown = set(body) - {"fingerprint", "keys", "token_ids", "extra", "deadline_ms"}
    if unknown:
        raise BadHint(400, f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    fp = body.get("fingerprint")
    if not isinstance(fp, str) or not 0 < len(fp) <= MAX_FINGERPRINT:
        raise BadHint(
            400, f"'fingerprint' must be a non-empty string of at most {MAX_FINGERPRINT} characters"
        )
    deadline_ms = body.get("deadline_ms", default_deadline * 1000)
    if (
        isinstance(deadline_ms, bool)
        or not isinstance(deadline_ms, int | float)
        or not math.isfinite(deadline_ms)
        or not 0 < deadline_ms <= MAX_DEADLINE_MS
    ):
        raise BadHint(400, f"'deadline_ms' must be a number above 0 and at most {MAX_DEADLINE_MS}")
    extra = body.get("extra")
    if extra is not None and (not isinstance(extra, str) or len(extra) > MAX_EXTRA):
        raise BadHint(400, f"'extra' must be a string of at most {MAX_EXTRA} characters")
    if ("keys" in body) == ("token_ids" in body):
        raise BadHint(400, "give exactly one of 'keys' (hex) and 'token_ids'")
    if "keys" in body:
        keys = body["keys"]
        if not isinstance(keys, list) or not 0 < len(keys) <= MAX_KEYS:
            raise BadHint(400, f"'keys' must be a list of 1 to {MAX_KEYS} keys")
        try:
            if not all(isinstance(k, str) and len(k) == KEY_HEX for k in keys):
                raise ValueError
            parsed = tuple(bytes.fromhex(k) for k in keys)
        except ValueError:
            raise BadHint(400, f"each key must be {KEY_HEX} hex characters") from None
        return Hint(fp, deadline_ms / 1000, keys=parsed, extra=extra)
    tokens = body["token_ids"]
    if not isinstance(tokens, list) or not 0 < len(tokens) <= MAX_TOKENS:
        raise BadHint(400, f"'token_ids' must be a list of 1 to {MAX_TOKENS} integers")
    if not all(type(t) is int and 0 <= t < 1 << 32 for t in tokens):
        raise BadHint(400, "'token_ids' must hold integers from 0 to 2**32-1")
    return Hint(fp, deadline_ms / 1000, token_ids=tuple(tokens), extra=extra)


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

    def prefetch(self, hint: Hint, public: bool = False) -> dict[str, Any]:
        """The agent's result. A public hint's result is counted as `public` only: the probe port's
        metrics must not tell another pod what its hint found."""
        client = self.client()
        keys = list(hint.keys) or block_keys(list(hint.token_ids), client.block_tokens, hint.extra)
        if len(keys) > MAX_KEYS:
            raise BadHint(400, f"the token ids make {len(keys)} blocks, more than {MAX_KEYS}")
        if not keys:
            raise BadHint(400, f"fewer token ids than one block ({client.block_tokens} tokens)")
        t0 = time.monotonic()
        result = client.call(  # Client serializes calls on its connection
            "prefetch", fingerprint=hint.fingerprint, keys=[k.hex() for k in keys], deadline=hint.deadline
        )["result"]
        result["seconds"] = round(time.monotonic() - t0, 4)
        if public:
            self.hints.labels("public").inc()
            return result
        self.hints.labels("late" if result.get("late") else "done").inc()
        self.blocks.labels("promoted").inc(result.get("promoted", 0))
        self.blocks.labels("fetched").inc(result.get("fetched", 0))
        self.blocks.labels("already_in_dram").inc(result.get("dram", 0))
        self.bytes.inc(result.get("fetchedBytes", 0))
        if result.get("late"):
            self.late.inc()
        return result

    def answer(self, hint: Hint, public: bool = False) -> tuple[int, dict[str, Any]]:
        """(status, reply) for a parsed hint; the agent's failures become short reasons."""
        try:
            return 200, self.prefetch(hint, public)
        except BadHint as exc:
            self.hints.labels("invalid").inc()
            return exc.status, {"error": str(exc)}
        except AgentError as exc:
            self.hints.labels("invalid").inc()
            return 400, {"error": f"the agent refused the hint: {str(exc)[:200]}"}
        except CONNECTION_LOST as exc:
            self.conn.lost(exc)  # the next hint connects again
            self.hints.labels("agent_down").inc()
            return 503, {"error": "agent not reachable"}
        except Exception as exc:  # an answer the sidecar did not expect: short, never a dropped connection
            log.exception("hint failed")
            return 500, {"error": f"internal error: {type(exc).__name__}"}


class Server(ThreadingHTTPServer):
    """At most MAX_CONNECTIONS requests at a time; more are closed at once."""

    daemon_threads = True

    def __init__(self, address, handler) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Background:
    """The public endpoint's hints, done one at a time after the 202 went out."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.queue: queue.Queue[Hint] = queue.Queue(PUBLIC_QUEUE)
        threading.Thread(target=self._run, name="public-hints", daemon=True).start()

    def offer(self, hint: Hint) -> bool:
        try:
            self.queue.put_nowait(hint)
            return True
        except queue.Full:
            return False

    def _run(self) -> None:
        while True:
            hint = self.queue.get()
            try:
                self.sidecar.answer(hint, public=True)
            except Exception:
                log.exception("public hint failed")


def make_handler(sidecar: Sidecar, role: str = "hints", token: bytes | None = None, background=None):
    """role: "hints" (the pod's own, full replies), "probes" (healthz and metrics only) or
    "public" (token-authenticated hints, answered 202 with nothing about the cache)."""

    class Handler(BaseHTTPRequestHandler):
        timeout = READ_TIMEOUT  # a client that stops sending loses its connection
        protocol_version = "HTTP/1.0"
        default_request_version = "HTTP/1.0"  # answers to unparsable request lines carry a status line too

        def log_message(self, fmt: str, *args) -> None:
            log.debug(fmt, *args)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            # the standard library answers 501/505 to odd methods and versions: those are the client's fault
            code = {501: 405, 505: 400}.get(code, code)
            self._json(code, {"error": (message or self.responses.get(code, ("error",))[0])[:120]})

        def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: dict[str, Any]) -> None:
            self._send(code, json.dumps(obj).encode())

        def do_GET(self) -> None:
            if role == "public":
                self._json(404, {"error": "not found"})
            elif self.path == "/healthz":
                ok = sidecar.healthy()
                self._send(200 if ok else 503, b"ok" if ok else b"agent not reachable", "text/plain")
            elif self.path == "/metrics":
                self._send(200, generate_latest(sidecar.registry), "text/plain; version=0.0.4")
            else:
                self._json(404, {"error": "not found"})

        def _refuse_method(self) -> None:
            self._json(405, {"error": "method not allowed"})

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse_method

        def _body(self) -> bytes:
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise BadHint(411, "Content-Length is required")
            if not raw.isdigit():
                raise BadHint(400, "Content-Length must be a number")
            length = int(raw)
            if length == 0:
                raise BadHint(400, "the body is empty")
            if length > MAX_BODY:
                raise BadHint(413, f"the body is larger than {MAX_BODY} bytes")
            body = self.rfile.read(length)
            if len(body) < length:
                raise BadHint(400, "the body is shorter than its Content-Length")
            return body

        def do_POST(self) -> None:
            if role == "probes" or self.path != "/v1/hints":
                self._json(404, {"error": "not found"})
                return
            if role == "public" and not self._authorized():
                self._json(401, {"error": "a bearer token is required"})
                return
            try:
                hint = parse_hint(self._body(), sidecar.default_deadline)
            except BadHint as exc:
                sidecar.hints.labels("invalid").inc()
                self._json(exc.status, {"error": str(exc)})
                return
            except OSError:  # the client timed out or went away mid-body
                self.close_connection = True
                return
            if role == "public":
                if background.offer(hint):
                    self._json(202, {"accepted": True})
                else:
                    self._json(429, {"error": "too many hints queued"})
                return
            status, reply = sidecar.answer(hint)
            self._json(status, reply)

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization", "")
            return given.startswith("Bearer ") and hmac.compare_digest(
                given[7:].strip().encode(), token or b"\0"
            )

    return Handler


def read_token(path: str) -> bytes:
    token = Path(path).read_bytes().strip()
    if len(token) < 16:
        raise SystemExit(f"the hint token in {path} is shorter than 16 bytes")
    return token


def main(args: argparse.Namespace) -> int:
    logs.setup(args)
    sidecar = Sidecar(args.socket, args.deadline)
    servers = [Server((args.host, args.port), make_handler(sidecar))]
    if args.probe_port is not None:
        servers.append(Server(("0.0.0.0", args.probe_port), make_handler(sidecar, "probes")))
    if args.public_port is not None:
        if not args.token_file:
            raise SystemExit("--public-port needs --token-file: the cross-pod endpoint is never open")
        handler = make_handler(sidecar, "public", read_token(args.token_file), Background(sidecar))
        servers.append(Server(("0.0.0.0", args.public_port), handler))
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    listening = " ".join(f"{s.server_address[0]}:{s.server_address[1]}" for s in servers)
    print(f"kvtier sidecar ready pool={args.pool} http={listening}", flush=True)
    servers[0].serve_forever()
    return 0
