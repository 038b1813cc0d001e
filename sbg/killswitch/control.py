"""How the admin API changes the kill switch: `SwitchControl`.

A node alone changes its `KillSwitch` (`LocalControl`); a node of a
cluster also goes through Redis (`sbg.cluster.sync.ClusterKillSwitch`).
Both answer an `Outcome`, the admin API's status and JSON body, through a
Deferred: a cluster's answer may wait for Redis (never the reactor, never a
federation request).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer

from sbg.killswitch.switch import KillSwitch, KillSwitchPersistError


@dataclass(frozen=True)
class Outcome:
    """What an engage or lift came to.

    Attributes:
        status: the admin API's HTTP status.
        body: its JSON body (the state after the change, or an error).
        applied: whether the change is in force here (it is logged).
    """

    status: int
    body: dict[str, Any]
    applied: bool


def error(status: int, errcode: str, text: str, *, applied: bool, **extra: Any) -> Outcome:
    return Outcome(status, {"errcode": errcode, "error": text, **extra}, applied)


class SwitchControl(Protocol):
    """What the admin API asks of the kill switch."""

    @property
    def killswitch(self) -> KillSwitch: ...

    def state(self) -> dict[str, Any]:
        """`GET /_sbg/kill`'s body."""
        ...

    def engage(
        self, server: str | None, direction: str, reason: str | None, by: str | None
    ) -> defer.Deferred[Outcome]: ...

    def lift(
        self, server: str | None, direction: str, by: str | None
    ) -> defer.Deferred[Outcome]: ...


def not_persisted(ks: KillSwitch, **extra: Any) -> Outcome:
    return error(
        500,
        "M_UNKNOWN",
        "the switch is engaged but not persisted: it would not survive a restart "
        f"(cannot write {ks.path})",
        applied=True,
        **extra,
    )


class LocalControl:
    """A node alone: the switch changes here, and is persisted in `state_dir`."""

    def __init__(self, killswitch: KillSwitch) -> None:
        self._ks = killswitch

    @property
    def killswitch(self) -> KillSwitch:
        return self._ks

    def state(self) -> dict[str, Any]:
        return self._ks.as_json()

    def engage(
        self, server: str | None, direction: str, reason: str | None, by: str | None
    ) -> defer.Deferred[Outcome]:
        if not self._ks.engage(server, direction, reason=reason, by=by):
            return defer.succeed(not_persisted(self._ks))
        return defer.succeed(Outcome(200, self.state(), True))

    def lift(self, server: str | None, direction: str, by: str | None) -> defer.Deferred[Outcome]:
        try:
            self._ks.lift(server, direction)
        except KillSwitchPersistError as e:
            return defer.succeed(
                error(
                    500,
                    "M_UNKNOWN",
                    f"cannot persist the kill-switch state ({e}): nothing was lifted",
                    applied=False,
                )
            )
        return defer.succeed(Outcome(200, self.state(), True))
