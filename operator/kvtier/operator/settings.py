"""The operator's configuration: one object, read once when the process starts (`kvtier operator`
builds it from its flags and the environment the chart sets) and handed to the handlers through
kopf's `memo`. Nothing else in the operator reads the environment, so importing a module never
fixes a setting."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Each setting and the environment variable it comes from (the chart's operator.yaml sets them).
ENVIRONMENT = {
    "namespace": "KVTIER_NAMESPACE",
    "image": "KVTIER_IMAGE",
    "status_interval": "KVTIER_STATUS_INTERVAL",
    "status_debounce": "KVTIER_STATUS_DEBOUNCE",
    "resync_seconds": "KVTIER_RESYNC_SECONDS",
    "metrics_port": "KVTIER_METRICS_PORT",
    "webhook_on_refusal": "KVTIER_WEBHOOK_ON_REFUSAL",
}


class OperatorSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = Field("kvtier-system", min_length=1, description="Where agents' DaemonSets live.")
    image: str | None = Field(
        None, description="The chart's image: agents of pools that keep the default agent image run it."
    )
    status_interval: float = Field(
        30.0, gt=0, description="Seconds between usage-only status writes, per pool."
    )
    status_debounce: float = Field(0.1, ge=0, description="Seconds from an event to recomputing the status.")
    resync_seconds: float = Field(60.0, gt=0, description="Seconds between drift checks of the children.")
    metrics_port: int = Field(0, ge=0, le=65535, description="The operator's own metrics; 0: none.")
    webhook_on_refusal: Literal["deny", "warn"] = Field(
        "deny", description="A pod that cannot be injected: refused, or admitted with a warning."
    )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> OperatorSettings:
        """Settings from the environment (`os.environ` unless given), with `overrides` (command-line
        flags) winning. A bad value stops the operator with the variable's name."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {field: env[var] for field, var in ENVIRONMENT.items() if env.get(var)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENVIRONMENT.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()
            )
            raise SystemExit(f"invalid operator settings: {problems}") from None
