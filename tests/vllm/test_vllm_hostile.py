"""Hostile and odd requests, and an agent that lies, against the connector's scheduler side inside
vLLM's real v1 Scheduler (engine.py). What must hold: no exception from kvtier into the engine,
no read of wrong KV that the connector did not report, every request finishes and every page comes
back."""

from __future__ import annotations

import contextlib
import socketserver
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")
from tests.vllm.engine import B, Engine, prompt
from tests.vllm.test_vllm_scheduler import finished_clean

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


@contextlib.contextmanager
def lying_agent(path: Path, answer):
    """An agent socket whose replies are `answer(request)` (hello is answered truthfully, with no
    segments): what a broken or hostile agent can tell the connector."""
    from kvtier.agent.api import protocol

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with contextlib.suppress(OSError, protocol.ProtocolError):
                while True:
                    msg, _ = protocol.recv(self.request)
                    if msg.get("op") == "hello":
                        reply = {"namespace": "team-a", "isolation": "namespace", "segmentBytes": 1 << 20}
                        reply["blockTokens"] = B
                    else:
                        reply = answer(msg)
                    protocol.send(self.request, {"id": msg.get("id"), "ok": True, **reply})

    server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield str(path)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "hits", [10**6, 4, 3.5, "3", -7], ids=["a-million", "past-the-prompt", "float", "string", "negative"]
)
def test_an_agent_that_lies_about_its_hits_costs_a_recompute_not_the_engine(tmp_path, hits):
    """The agent answers every lookup with `hits` blocks (a prompt of 3 full blocks and 8 tokens) and
    every read with blocks nobody can map. vLLM must not be told to skip tokens the prompt does not
    have (its scheduler asserts), and what the connector planned to load is recomputed."""

    def answer(msg):
        if msg["op"] == "lookup":
            return {"hits": hits, "tiers": []}
        if msg["op"] == "read":  # more blocks than asked for, in a segment it never sent
            return {"blocks": [[7, 0, 4096, "ab"]] * (len(msg["keys"]) + 2), "tiers": []}
        return {"extents": []} if msg["op"] == "allocate" else {}

    with lying_agent(tmp_path / "liar.sock", answer) as path:
        e = Engine(path)
        tokens = prompt(21, 3 * B + 8)
        e.add(e.request("r", tokens))
        e.run(timeout=60)
        assert e.wrong_kv_unreported() == [], "every page a failed load left was recomputed"
        assert "r" in e.finished
        finished_clean(e)
        e.close()
