"""A restarted agent (the kubelet restarting its container) serves the tenant sockets of its previous
run at the same paths: pods hold bind mounts of those folders and reconnect without a new volume."""

from __future__ import annotations

import signal

import pytest

from kvtier.agent.client import Client
from tests.integration.test_agent import FP, blobs, chain
from tests.support import agent_config

pytestmark = pytest.mark.integration


def test_a_restarted_agent_answers_on_the_old_tenant_socket(agent, tmp_path):
    cfg = agent_config(tmp_path)
    first = agent(cfg)
    path = first.tenant("team-a")
    with Client(path) as c:
        c.put(FP, chain(2), blobs(2), sync=True, wait=5)
    first.kill(signal.SIGKILL)
    agent(cfg, name="restarted")
    with Client(path) as c:  # nobody asked the new agent for team-a: the same path answers
        assert c.lookup(FP, chain(2)) == 2
