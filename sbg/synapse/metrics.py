"""`sbg_room_refusals_total{rule}` on Synapse's metrics listener.

Synapse serves prometheus_client's default registry; the counter is
registered there once per process (a second module instance reuses it).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, Counter

NAME = "sbg_room_refusals"
DOCUMENTATION = (
    "Room rule refusals by the sbg.synapse.RoomRules module, and corrections of "
    "rule R8 (rule label R1-R8)."
)


def room_refusals(registry: Any = REGISTRY) -> Counter:
    """The counter, registered in REGISTRY if it is not there yet."""
    existing = getattr(registry, "_names_to_collectors", {}).get(NAME + "_total")
    if isinstance(existing, Counter):
        return existing
    return Counter(NAME, DOCUMENTATION, ["rule"], registry=registry)
