"""Render CustomResourceDefinitions from the pydantic models (pure functions).

pydantic's JSON Schema is turned into a structural OpenAPI v3 schema as the API server wants it:
$refs inlined, Optional unwrapped, Literal -> enum, int-or-string marked, JSON-Schema-2020 numeric
bounds rewritten to OpenAPI 3.0's, titles and null defaults dropped.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kvtier.api import v1alpha1 as api

_DROP = {"title", "discriminator"}


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, list):
        return [_inline(s, defs) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].split("/")[-1]])
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        return _inline(_merge(target, extra), defs)
    if "allOf" in schema and len(schema["allOf"]) == 1:
        extra = {k: v for k, v in schema.items() if k != "allOf"}
        return _inline(_merge(copy.deepcopy(schema["allOf"][0]), extra), defs)
    return {k: _inline(v, defs) for k, v in schema.items()}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Field-level keys win, except CEL rules, which add up (the model's and the field's)."""
    merged = {**base, **extra}
    rules = base.get("x-kubernetes-validations", []) + extra.get("x-kubernetes-validations", [])
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _structural(schema: dict[str, Any]) -> dict[str, Any]:
    schema = {k: v for k, v in schema.items() if k not in _DROP}
    if "anyOf" in schema:
        options = [o for o in schema.pop("anyOf") if o.get("type") != "null"]
        if schema.get("x-kubernetes-int-or-string"):
            # int | str | Literal[...]: the API server sees one int-or-string; CEL narrows it.
            pass
        elif len(options) == 1:
            schema = {**_structural(options[0]), **schema}
        else:
            raise ValueError(f"cannot express anyOf in a structural schema: {options}")
    if schema.get("default", 0) is None:
        del schema["default"]
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
        schema.setdefault("type", "string")
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(schema.get(bound), int | float) and not isinstance(schema.get(bound), bool):
            schema[plain] = schema[bound]
            schema[bound] = True
    if "properties" in schema:
        schema["properties"] = {k: _structural(v) for k, v in schema["properties"].items()}
        schema["type"] = "object"
        if schema.get("additionalProperties") is False:
            del schema["additionalProperties"]
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _structural(schema["additionalProperties"])
    if "items" in schema:
        schema["items"] = _structural(schema["items"])
    return schema


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of a model, as a CRD version's schema wants it."""
    raw = model.model_json_schema(mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_inline(raw, defs))


def _resource_schema(
    spec: type[BaseModel], status: type[BaseModel], description: str, *rules: dict[str, str]
) -> dict[str, Any]:
    schema = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": openapi_schema(spec),
            "status": openapi_schema(status),
        },
    }
    if rules:  # the only place CEL may read metadata (name and generateName)
        schema["x-kubernetes-validations"] = list(rules)
    return schema


def _crd(
    kind: str,
    plural: str,
    short: str,
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{api.GROUP}", "labels": {"app.kubernetes.io/part-of": "kvtier"}},
        "spec": {
            "group": api.GROUP,
            "scope": "Cluster",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["kvtier"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def _column(name: str, path: str, type_: str = "string", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, "jsonPath": path, **extra}


def kvcachepool_crd() -> dict[str, Any]:
    schema = _resource_schema(
        api.KVCachePoolSpec,
        api.KVCachePoolStatus,
        "A KV-cache pool: DRAM and NVMe tiers on a set of GPU nodes, served by one agent per node.",
        api.cel(
            f"self.metadata.name.matches('{api.POOL_NAME}')",
            api.POOL_NAME_MESSAGE,
        ),
    )
    columns = [
        _column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
        _column("Nodes", ".status.display.nodes", description="ready/desired agents"),
        _column("DRAM", ".status.display.dram", description="used/capacity over all nodes"),
        _column("NVMe", ".status.display.nvme", description="used/capacity over all nodes"),
        _column("Hit", ".status.display.hit", description="lookup hit ratio"),
        _column("Age", ".metadata.creationTimestamp", "date"),
    ]
    return _crd("KVCachePool", "kvcachepools", "kvp", schema, columns)


def kvcachenode_crd() -> dict[str, Any]:
    schema = _resource_schema(
        api.KVCacheNodeSpec,
        api.KVCacheNodeStatus,
        "One pool's agent on one node: capacity, usage, devices and health, written by that agent.",
    )
    columns = [
        _column("Pool", ".spec.pool"),
        _column("Node", ".spec.node"),
        _column("Health", ".status.health"),
        _column("DRAM-Used", ".status.tiers.dram.usedBytes", "integer"),
        _column("Blocks", ".status.tiers.dram.blocks", "integer"),
        _column("Draining", '.status.conditions[?(@.type=="Draining")].status'),
        _column("Drain", ".status.drain.progress", description="moved/planned bytes of the drain"),
        _column("Offered", ".status.drain.offer.progress", description="hottest blocks settled with peers"),
        _column("Heartbeat", ".status.heartbeat", "date"),
    ]
    return _crd("KVCacheNode", "kvcachenodes", "kvn", schema, columns)


def all_crds() -> list[dict[str, Any]]:
    return [kvcachepool_crd(), kvcachenode_crd()]


def render_yaml(crd: dict[str, Any]) -> str:
    header = "# Generated from kvtier.api.v1alpha1 by `kvtier crds --write`. Do not edit.\n"
    return header + yaml.safe_dump(crd, sort_keys=False, width=120)


def crd_files(repo: Path) -> dict[Path, str]:
    """Every checked-in copy of the CRDs: crds/ and the chart's files/crds/ (installed as templates, kept current on upgrade)."""
    files: dict[Path, str] = {}
    for crd in all_crds():
        name = f"{crd['metadata']['name']}.yaml"
        text = render_yaml(crd)
        files[repo / "crds" / name] = text
        files[repo / "charts" / "kvtier" / "files" / "crds" / name] = text
    return files
