"""Fill in the nginx configuration templates beside this module."""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def render(template: str, destination: str, **values: object) -> str:
    """Write bench/TEMPLATE with its `{name}` placeholders replaced; return the path.

    Only the given names are replaced, so nginx's own braces stay as they are.
    """
    with open(os.path.join(_HERE, template), encoding="utf-8") as f:
        text = f.read()
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    with open(destination, "w", encoding="utf-8") as f:
        f.write(text)
    return destination


def nginx_argv(binary: str, prefix: str, conf: str) -> list[str]:
    return [binary, "-p", prefix + "/", "-c", conf, "-e", os.path.join(prefix, "nginx-stderr.log")]
