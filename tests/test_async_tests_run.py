"""Every `async def` test method really runs, on every supported Twisted.

Twisted 22.4's trial (Debian 12) calls a coroutine test method, drops the
coroutine unawaited and counts a success. A test class with `async def`
tests must therefore derive from `tests.asynctest.TestCase` (or wrap each
such method, e.g. with `testbed.tlstools.deferred_test`), so that what trial
finds under a `test*` name is a plain function returning a Deferred.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from twisted.trial.unittest import SynchronousTestCase

import tests
from tests.asynctest import TestCase as AsyncTestCase


def _test_classes() -> list[type]:
    classes = []
    for info in pkgutil.iter_modules(tests.__path__):
        if not info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"tests.{info.name}")
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, SynchronousTestCase)
                and value.__module__ == module.__name__
            ):
                classes.append(value)
    return classes


class AsyncTestsRunTests(SynchronousTestCase):
    def test_no_test_method_is_a_bare_coroutine_function(self) -> None:
        bare = [
            f"{cls.__module__}.{cls.__qualname__}.{name}"
            for cls in _test_classes()
            for name in dir(cls)
            if name.startswith("test") and inspect.iscoroutinefunction(getattr(cls, name))
        ]
        self.assertEqual(bare, [], "use tests.asynctest.TestCase for these classes")

    def test_the_check_sees_a_bare_coroutine_test(self) -> None:
        class Bare(SynchronousTestCase):
            async def test_x(self) -> None:
                pass

        class Wrapped(AsyncTestCase):
            async def test_x(self) -> None:
                pass

        self.assertTrue(inspect.iscoroutinefunction(Bare.test_x))
        self.assertFalse(inspect.iscoroutinefunction(Wrapped.test_x))

    def test_the_walk_finds_the_async_test_classes(self) -> None:
        names = {f"{c.__module__}.{c.__qualname__}" for c in _test_classes()}
        self.assertIn("tests.test_inbound.RefusalTests", names)
        self.assertIn("tests.test_tls_client.ClientTLSTests", names)
