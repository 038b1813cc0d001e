"""Print the trial test modules of one tier (`--unit`: all but tests.e2e)."""

from __future__ import annotations

import pkgutil
import sys

import tests


def main() -> None:
    names = sorted(
        f"tests.{m.name}"
        for m in pkgutil.iter_modules(tests.__path__)
        if m.name.startswith("test_")
    )
    if "--unit" not in sys.argv:
        names.append("tests.e2e")
    print(" ".join(names))


if __name__ == "__main__":
    main()
