"""API models, quantities and the generated CRDs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvtier.api import v1alpha1 as api
from kvtier.api.crds import crd_files, kvcachepool_crd
from kvtier.api.quantity import format_bytes, parse_quantity
from kvtier.dev.tools import repo_root

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "bytes_"),
    [
        ("64Gi", 64 << 30),
        ("500M", 500_000_000),
        (1024, 1024),
        ("1.5Gi", 3 << 29),
        ("1e3", 1000),
        ("0.5Ki", 512),
    ],
)
def test_parse_quantity(text, bytes_):
    assert parse_quantity(text) == bytes_


@pytest.mark.parametrize(
    "bad", ["lots", "", "1Gb", "Gi", " 64Gi ", "1e1000000", "1.2.3", "2Ei", 10**30, float("nan")]
)
def test_parse_quantity_refuses_garbage(bad):
    with pytest.raises(ValueError, match=r"quantity|more than 1Ei"):  # a ValueError, never an overflow
        parse_quantity(bad)


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 512, 2048, 3 << 29, 2 << 40)] == ["0", "512", "2Ki", "1.5Gi", "2Ti"]


def test_checked_in_crds_match_the_models():
    stale = [p for p, text in crd_files(repo_root()).items() if not p.exists() or p.read_text() != text]
    assert not stale, f"regenerate with `kvtier crds --write`: {stale}"


def test_crd_schema_is_structural_and_carries_the_rules():
    schema = kvcachepool_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = str(schema)
    assert "$ref" not in text and "anyOf" not in text and "title" not in text
    spec = schema["properties"]["spec"]["properties"]
    assert spec["blockTokens"]["default"] == 256
    assert spec["eviction"]["default"] == {"policy": "s3fifo", "highWatermark": 0.9, "lowWatermark": 0.8}
    assert spec["tiers"]["properties"]["dram"]["properties"]["size"]["x-kubernetes-int-or-string"] is True
    messages = [r["message"] for r in spec["tiers"]["properties"]["nvme"]["x-kubernetes-validations"]]
    assert any("immutable" in m for m in messages)


def _spec(**kw):
    return {"tiers": {"dram": {"size": "1Gi"}}, **kw}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_spec(blockTokens=100), "multiple of 16"),
        (_spec(eviction={"highWatermark": 0.5, "lowWatermark": 0.6}), "lowWatermark must be below"),
        ({"tiers": {"dram": {"size": "0"}}}, "positive quantity"),
        ({"tiers": {"dram": {"size": "1Gi"}, "nvme": {"size": "1Ti", "mode": "file"}}}, "path is required"),
        (_spec(surprise=True), "Extra inputs"),
    ],
)
def test_models_refuse_what_the_api_server_refuses(spec, message):
    with pytest.raises(ValidationError, match=message):
        api.KVCachePoolSpec.model_validate(spec)


def test_duration():
    assert (
        api.parse_duration("2s") == 2
        and api.parse_duration("1m30s") == 90
        and api.parse_duration("250ms") == 0.25
    )
