"""Errors that carry their own operator- or wire-facing meaning."""

from __future__ import annotations


class SbgError(Exception):
    """A refusal: an HTTP status, a Matrix errcode and a human reason.

    `code` is the short, fixed refusal code used as the `reason` label of
    `sbg_refusals_total` (never free text); `reason` is the human text sent
    in the error body and written to the audit log.
    """

    def __init__(self, status: int, errcode: str, reason: str, code: str) -> None:
        super().__init__(reason)
        self.status = status
        self.errcode = errcode
        self.reason = reason
        self.code = code


class ConfigError(Exception):
    """One problem in a configuration file, at a key path.

    `key_path` uses dots and 0-based list indexes, e.g.
    `external_homeservers[0].verify_keys."ed25519:x"`; it is empty for a
    problem with the file as a whole.
    """

    def __init__(self, key_path: str, message: str) -> None:
        super().__init__(f"{key_path}: {message}" if key_path else message)
        self.key_path = key_path
        self.message = message


class ConfigErrors(Exception):
    """Every problem found in one configuration file (never only the first)."""

    def __init__(self, path: str, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.path = path
        self.errors = errors

    def lines(self) -> list[str]:
        return [str(e) for e in self.errors]


# Every refusal code sbg uses: the `code` of each `SbgError` raised anywhere
# in sbg/, and the connection-limit reasons. These are the only values of the
# `reason` label of `sbg_refusals_total`; the README's table documents each
# one, and tests/test_refusal_codes.py checks both against the source.
REFUSAL_CODES: frozenset[str] = frozenset(
    {
        # inbound routing and the endpoint table
        "unknown_host",
        "sni_mismatch",
        "malformed_target",
        "unknown_endpoint",
        "method_not_allowed",
        # kill switch
        "killswitch",
        # authentication
        "missing_auth",
        "multiple_auth",
        "malformed_auth",
        "unknown_origin",
        "source_ip",
        "bad_destination",
        "unknown_key",
        "bad_signature",
        # bodies
        "body_too_large",
        "bad_json",
        "unexpected_body",
        # trust levels
        "group_not_allowed",
        # origin consistency (contract 5.3)
        "origin_mismatch",
        "pdu_sender_mismatch",
        "edu_user_mismatch",
        "to_device_sender_mismatch",
        "membership_user_mismatch",
        "impersonates_internal_user",
        "malformed_content",
        "untrusted_relayed_sender",
        # outbound proxy
        "plain_http",
        "proxy_auth",
        "malformed_request",
        "unknown_destination",
        "host_mismatch",
        "discovery_only",
        "non_matrix_not_allowed",
        "no_ca",
        "upstream_no_trust",
        # resource limits
        "overloaded",
        "max_connections",
        "max_connections_per_ip",
        "rate_limited_ip",
        "rate_limited_origin",
        # a bug in sbg (answered 500, logged with its traceback)
        "internal_error",
    }
)
