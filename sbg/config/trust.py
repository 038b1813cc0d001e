"""The `trust_levels` section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from sbg.config import model
from sbg.config.reader import (
    BaseReader,
    _kind,
    _suggest,
    key_path,
)
from sbg.matrix.groups import GROUPS

MODES = ("enforce", "monitor")
_TRUST_LEVEL_KEYS = ("inbound", "outbound", "mode", "rate_limit", "rooms")
_ROOMS_KEYS = ("invite", "join_public", "max_power_level")
ROOM_INVITES = ("open_rooms", "private_rooms", "none")
# A local room administrator (power level 100) can lower only the levels
# below its own: at 100 an external user could no longer be corrected.
MAX_EXTERNAL_POWER_LEVEL = 99


class TrustReader(BaseReader):
    """`trust_levels` and the check that every server names one."""

    def trust_levels(self, top: Mapping[str, object]) -> tuple[model.TrustLevel, ...] | None:
        """The trust levels; None when the section itself is unusable."""
        value = top.get("trust_levels")
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.error("trust_levels", f"must be a mapping, not {_kind(value)}")
            return None
        result = []
        for name, levels in value.items():
            path = key_path("trust_levels", name)
            if not isinstance(name, str) or not name.strip():
                self.error(path, "a trust level name must be a non-empty string")
                continue
            m = self.mapping(levels, path, _TRUST_LEVEL_KEYS)
            if m is None:
                result.append(model.TrustLevel(name, frozenset(), frozenset()))
                continue
            level_mode = self.choice(m, "mode", path, MODES, "") or None
            result.append(
                model.TrustLevel(
                    name=name,
                    inbound=self.groups(m, "inbound", path),
                    outbound=self.groups(m, "outbound", path),
                    mode=cast(model.Mode | None, level_mode),
                    rate_limit=self.rate_limit(m.get("rate_limit"), key_path(path, "rate_limit")),
                    rooms=self.room_settings(m.get("rooms"), key_path(path, "rooms")),
                )
            )
        return tuple(result)

    def room_settings(self, value: object, path: str) -> model.RoomSettings:
        """A trust level's `rooms:` block; absent or null: the V1 profile."""
        d = model.RoomSettings()
        m = self.mapping(value, path, _ROOMS_KEYS)
        if m is None:
            return d
        invite = self.choice(m, "invite", path, ROOM_INVITES, d.invite)
        max_level = self.integer(
            m,
            "max_power_level",
            path,
            default=d.max_power_level,
            minimum=0,
            maximum=MAX_EXTERNAL_POWER_LEVEL,
        )
        return model.RoomSettings(
            invite=cast(model.RoomInvite, invite),
            join_public=self.boolean(m, "join_public", path, d.join_public),
            max_power_level=d.max_power_level if max_level is None else max_level,
        )

    def groups(self, m: Mapping[str, object], key: str, path: str) -> frozenset[str]:
        result = set()
        for item_path, item in self.items(m, key, path):
            text = self.string_value(item, item_path, required=True)
            if text is None:
                continue
            if text not in GROUPS:
                self.error(item_path, f"unknown endpoint group {text!r}" + _suggest(text, GROUPS))
                continue
            result.add(text)
        return frozenset(result)

    def check_trust_level_names(
        self, externals: list[tuple[str, model.ExternalHomeserver]], names: set[str]
    ) -> None:
        for path, ext in externals:
            if ext.trust_level and ext.trust_level not in names:
                known = ", ".join(repr(n) for n in sorted(names)) or "none is defined"
                self.error(
                    key_path(path, "trust_level"),
                    f"{ext.trust_level!r} is not a key of trust_levels ({known})",
                )
