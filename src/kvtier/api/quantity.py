"""Kubernetes resource quantities ("64Gi", "500M", 1073741824) as bytes, and back for display."""

from __future__ import annotations

import re
from decimal import Decimal

_SUFFIX = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_SUFFIX["m"] = Decimal("0.001")  # milli: valid Kubernetes syntax, so parsed here too (and refused by size)
# Kubernetes' own grammar: no spaces, one optional sign, digits with at most one point, then a binary
# or decimal suffix or a decimal exponent. The API server (CEL isQuantity) reads exactly this.
_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]{1,3})|(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E))?$"
)
MAX_BYTES = 1 << 60  # 1Ei: far beyond any node, far below where arithmetic gets strange
MAX_QUANTITY = "1Ei"


def parse_quantity(value: str | int | float) -> int:
    """Bytes in a quantity, rounded up as the kubelet does. Raises ValueError on garbage and on
    anything above 1Ei (so `1e1000000` is a validation error, never an arithmetic overflow)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"not a quantity: {value!r}")
        amount = Decimal(str(value))
    else:
        match = _QUANTITY.match(value) if len(value) <= 64 else None
        if not match:
            raise ValueError(
                f"not a Kubernetes quantity: {value!r} (examples: 64Gi, 500M, 1073741824; no spaces)"
            )
        number, exponent, suffix = match.groups()
        amount = Decimal(number) * _SUFFIX[suffix or ""]
        if exponent:
            amount = amount.scaleb(int(exponent[1:]))
    if amount > MAX_BYTES:
        raise ValueError(f"{value!r} is more than {MAX_QUANTITY}")
    return int(amount.to_integral_value(rounding="ROUND_CEILING"))


def format_bytes(n: int | float) -> str:
    """Short binary form for status columns: 0, 512Ki, 1.5Gi."""
    n = float(n)
    for suffix in ("", "Ki", "Mi", "Gi", "Ti", "Pi"):
        if abs(n) < 1024 or suffix == "Pi":
            text = f"{n:.1f}".rstrip("0").rstrip(".") if suffix else f"{int(n)}"
            return f"{text}{suffix}"
        n /= 1024
    raise AssertionError("unreachable")
