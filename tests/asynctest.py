"""A trial TestCase whose `async def` tests run on every supported Twisted.

Twisted 22.4 (Debian 12) calls a coroutine test method and drops the
coroutine unawaited, counting a success; newer trial awaits it. Wrapping
each coroutine test in `ensureDeferred` makes both run it for real.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest


def _as_deferred(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(self: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.ensureDeferred(fn(self, *args, **kwargs))

    return run


class TestCase(unittest.TestCase):
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if name.startswith("test") and inspect.iscoroutinefunction(value):
                setattr(cls, name, _as_deferred(value))
