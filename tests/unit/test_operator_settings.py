"""The operator's settings come from one place, read once: the environment the chart sets, with the
command line winning; a bad value stops it naming the variable."""

from __future__ import annotations

import pytest

from kvtier.api import v1alpha1 as api
from kvtier.operator.admission import inject_settings
from kvtier.operator.settings import ENVIRONMENT, OperatorSettings

pytestmark = pytest.mark.unit


def test_defaults_without_environment():
    s = OperatorSettings.from_environment({})
    assert (s.namespace, s.image, s.status_interval, s.status_debounce) == ("kvtier-system", None, 30.0, 0.1)
    assert (s.resync_seconds, s.metrics_port, s.webhook_on_refusal) == (60.0, 0, "deny")
    assert inject_settings(s).image == api.DEFAULT_AGENT_IMAGE


def test_from_a_given_environment_with_flags_winning():
    env = {
        "KVTIER_NAMESPACE": "from-env",
        "KVTIER_IMAGE": "registry.local/kvtier:1.2.3",
        "KVTIER_STATUS_INTERVAL": "1",
        "KVTIER_STATUS_DEBOUNCE": "0",
        "KVTIER_RESYNC_SECONDS": "5",
        "KVTIER_METRICS_PORT": "8081",
        "KVTIER_WEBHOOK_ON_REFUSAL": "warn",
        "KVTIER_LOG": "DEBUG",  # the logging setup's, not the operator settings'
    }
    s = OperatorSettings.from_environment(env, namespace="kvtier-system", webhook_on_refusal=None)
    assert s.model_dump() == {
        "namespace": "kvtier-system",
        "image": "registry.local/kvtier:1.2.3",
        "status_interval": 1.0,
        "status_debounce": 0.0,
        "resync_seconds": 5.0,
        "metrics_port": 8081,
        "webhook_on_refusal": "warn",
    }
    assert set(ENVIRONMENT) == set(OperatorSettings.model_fields), "every setting has its variable"
    assert (
        inject_settings(s).image == "registry.local/kvtier:1.2.3" and inject_settings(s).on_refusal == "warn"
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KVTIER_STATUS_INTERVAL", "soon"),
        ("KVTIER_RESYNC_SECONDS", "0"),
        ("KVTIER_WEBHOOK_ON_REFUSAL", "maybe"),
    ],
)
def test_a_bad_value_names_its_variable(variable, value):
    with pytest.raises(SystemExit, match=variable):
        OperatorSettings.from_environment({variable: value})


def test_settings_are_read_once_and_frozen():
    s = OperatorSettings.from_environment({})
    with pytest.raises(ValueError):
        s.namespace = "other"  # type: ignore[misc]
