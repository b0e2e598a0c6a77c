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
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def parse_quantity(value: str | int | float) -> int:
    """Bytes in a quantity, rounded up as the kubelet does. Raises ValueError on garbage."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(Decimal(str(value)).to_integral_value(rounding="ROUND_CEILING"))
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r} (examples: 64Gi, 500M, 1073741824)")
    number, exponent, suffix = match.groups()
    amount = Decimal(number) * (Decimal(10) ** int(exponent[1:]) if exponent else 1) * _SUFFIX[suffix or ""]
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
