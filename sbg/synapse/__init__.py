"""The room rules as a Synapse module: `sbg.synapse.RoomRules` (docs/room-rules.md).

`matrix-synapse` is an optional extra (`pip install sbg[synapse]`). Only
`sbg.synapse.module` and `sbg.synapse.synapse_ops` import it, and only when
Synapse asks for `RoomRules`: importing this package, or any other part of
sbg, never imports Synapse.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "RoomRules":
        from sbg.synapse.module import RoomRules

        return RoomRules
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
