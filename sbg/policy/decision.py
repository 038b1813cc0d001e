"""What a decider returns: allow, deny, or (monitor mode) would deny.

Deciders raise `Refusal` for a refusal that nothing softens; the refusals
monitor mode may soften (trust levels, origin consistency: `Reason.soft`)
are collected with `Verdict` instead, so the mode is a property of the
decision, not of the code that carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sbg.reasons import Refusal

Effect = Literal["allow", "deny", "would_deny"]


@dataclass(frozen=True)
class Decision:
    """The outcome of the checks that monitor mode may soften.

    Attributes:
        refusal: the refusal that stands (None: the request may go on).
        would_deny: the refusals monitor mode softened, in check order.
    """

    refusal: Refusal | None = None
    would_deny: tuple[Refusal, ...] = ()

    @property
    def effect(self) -> Effect:
        if self.refusal is not None:
            return "deny"
        return "would_deny" if self.would_deny else "allow"


ALLOW = Decision()


class Verdict:
    """Collects the refusals of one request's softenable checks, in order.

    `monitor` is whether monitor mode applies to this request (its mode is
    `monitor` and it is authenticated); `refuse` then records a soft
    refusal instead of stopping, and the first refusal that cannot be
    softened stands.
    """

    def __init__(self, monitor: bool) -> None:
        self._monitor = monitor
        self._softened: list[Refusal] = []
        self._refusal: Refusal | None = None

    def refuse(self, refusal: Refusal) -> None:
        if self._refusal is not None:
            return
        if self._monitor and refusal.kind.soft:
            self._softened.append(refusal)
        else:
            self._refusal = refusal

    @property
    def stopped(self) -> bool:
        return self._refusal is not None

    def decision(self) -> Decision:
        return Decision(self._refusal, tuple(self._softened))
