"""An HTTP client that sends the request target exactly as it was received.

`twisted.web.client.Agent` rebuilds the request target from the parsed URL,
which drops an empty query (`/path?` becomes `/path`). The X-Matrix
signature covers the raw target, so sbg must send the very bytes it
received (and decided on): `RawTargetAgent.request_raw` does.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse


class InvalidTarget(ValueError):
    pass


def check_target(target: bytes) -> None:
    """A request target sbg may write on a request line: no space, no control."""
    if not target.startswith(b"/") or any(b <= 0x20 or b >= 0x7F for b in target):
        raise InvalidTarget("request target with a space, control or non-ASCII byte")


class RawTargetAgent(Agent):
    def request_raw(
        self,
        method: bytes,
        base_url: bytes,
        target: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        """Send `method target` to the server of `base_url` (scheme://host:port)."""
        try:
            check_target(target)
            parsed = URI.fromBytes(base_url + b"/")
            endpoint = self._getEndpoint(parsed)
        except Exception:
            return defer.fail(Failure())
        key = (parsed.scheme, parsed.host, parsed.port)
        return self._requestWithEndpoint(
            key, endpoint, method, parsed, headers, bodyProducer, target
        )
