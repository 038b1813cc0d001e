"""Origin consistency: the origin speaks only for itself (docs/decisions.md,
inbound step 20).

`check_origin_consistency` reads a few fields of an already parsed, already
signature-checked request body and refuses (403 `M_FORBIDDEN`) a request in
which the signing server speaks for a user or server other than itself. It
never changes anything: sbg can only allow or refuse the whole request.

Where the user ids must belong to the origin:

* `/send`: the transaction's `origin`; every PDU `sender`, except the relayed
  membership shapes (`m.room.member` with `sender == state_key` and membership
  `join`/`leave`/`knock`, and an `m.room.member` invite carrying
  `content.third_party_invite`), whose sender must still be on an internal or
  enabled external server; the user ids of the `m.typing`, `m.receipt`,
  `m.presence`, `m.device_list_update` and (`org.matrix.`)`m.signing_key_update`
  EDUs, and the `sender` of `m.direct_to_device`. Other EDU types pass.
* `make_join`/`make_leave`/`make_knock`: the `{userId}` path parameter.
* `send_join`/`send_leave`/`send_knock` (v1 and v2) and `invite` (v1: the body
  is the event; v2: its `event` member): the event `sender`.

A user id's server is everything after its first `:`, compared
case-sensitively. A mismatch naming an internal server is refused with code
`impersonates_internal_user` so the operator sees who was impersonated.

Malformed shapes: when a field this check must read is missing or has the
wrong type (`pdus`/`edus` not lists, a PDU or EDU that is not an object, an
EDU of a checked type without object `content`, a checked user id that is
absent, not a string or has no `:`, a transaction without a string `origin`),
the request is refused with 403 code `malformed_content`: sbg cannot show the
origin speaks only for itself, and no conforming server sends such a body
(Synapse itself rejects most of these shapes or drops the EDU). Fields the
check does not need are never looked at, so unknown EDU types and extra keys
pass untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

from sbg import reasons
from sbg.matrix.ids import server_of
from sbg.reasons import Reason, Refusal

_RELAYED_MEMBERSHIPS = frozenset({"join", "leave", "knock"})
_MAX_SHOWN = 80


def _show(value: object) -> str:
    """An attacker-supplied value made safe for a log line."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _refuse(detail: str, reason: Reason) -> NoReturn:
    raise Refusal(reason, detail)


def _malformed(what: str) -> NoReturn:
    _refuse(f"malformed request body: {what}", reasons.MALFORMED_CONTENT)


class _Check:
    """The facts every rule needs: who signed, and which servers are which."""

    def __init__(self, origin: str, internal: frozenset[str], external: frozenset[str]) -> None:
        self.origin = origin
        self.internal = internal
        self.external = external

    def user_server(self, user_id: object, what: str) -> str:
        """The server of a user id that must be a string with a `:`."""
        server = server_of(user_id) if isinstance(user_id, str) else None
        if server is None:
            _malformed(f"{what} is not a user id: {_show(user_id)}")
        return server

    def own(self, user_id: object, what: str, reason: Reason) -> None:
        """Refuse unless `user_id` belongs to the origin."""
        server = self.user_server(user_id, what)
        if server == self.origin:
            return
        if server in self.internal:
            _refuse(
                f"{self.origin} may not speak for internal user {_show(user_id)} ({what})",
                reasons.IMPERSONATES_INTERNAL_USER,
            )
        _refuse(f"{what} {_show(user_id)} does not belong to {self.origin}", reason)


def _obj(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        _malformed(f"{what} is not an object")
    return value


def _list(container: Mapping[str, Any], key: str) -> list[Any]:
    value = container.get(key, [])
    if not isinstance(value, list):
        _malformed(f"{key} is not a list")
    return value


# --------------------------------------------------------------------------
# /send: PDUs
# --------------------------------------------------------------------------


def _is_relayed_shape(pdu: Mapping[str, Any]) -> bool:
    """Whether a PDU is a membership a resident server may pass on."""
    if pdu.get("type") != "m.room.member":
        return False
    content = pdu.get("content")
    if not isinstance(content, dict):
        return False
    membership = content.get("membership")
    if membership in _RELAYED_MEMBERSHIPS:
        return pdu.get("state_key") == pdu.get("sender")
    return membership == "invite" and isinstance(content.get("third_party_invite"), dict)


def _check_pdu(check: _Check, pdu: object, index: int) -> None:
    pdu = _obj(pdu, f"pdus[{index}]")
    sender = pdu.get("sender")
    what = f"sender of pdus[{index}]"
    server = check.user_server(sender, what)
    if server == check.origin:
        return
    if not _is_relayed_shape(pdu):
        check.own(sender, what, reasons.PDU_SENDER_MISMATCH)
    if server not in check.internal and server not in check.external:
        _refuse(
            f"untrusted relayed sender {_show(sender)} in pdus[{index}]: "
            f"{_show(server)} is not a known server",
            reasons.UNTRUSTED_RELAYED_SENDER,
        )


# --------------------------------------------------------------------------
# /send: EDUs
# --------------------------------------------------------------------------


def _receipt_users(content: Mapping[str, Any]) -> Iterator[object]:
    for room_id, by_type in content.items():
        by_type = _obj(by_type, f"m.receipt content[{_show(room_id)}]")
        for receipt_type, by_user in by_type.items():
            yield from _obj(by_user, f"m.receipt receipts of type {_show(receipt_type)}")


def _presence_users(content: Mapping[str, Any]) -> Iterator[object]:
    for i, item in enumerate(_list(content, "push")):
        yield _obj(item, f"m.presence push[{i}]").get("user_id")


def _user_id(content: Mapping[str, Any]) -> Iterator[object]:
    yield content.get("user_id")


_EDU_USERS: Mapping[str, Callable[[Mapping[str, Any]], Iterator[object]]] = {
    "m.typing": _user_id,
    "m.receipt": _receipt_users,
    "m.presence": _presence_users,
    "m.device_list_update": _user_id,
    "m.signing_key_update": _user_id,
    "org.matrix.signing_key_update": _user_id,
}


def _check_edu(check: _Check, edu: object, index: int) -> None:
    edu = _obj(edu, f"edus[{index}]")
    edu_type = edu.get("edu_type")
    if not isinstance(edu_type, str):
        _malformed(f"edus[{index}] has no string edu_type")
    if edu_type == "m.direct_to_device":
        content = _obj(edu.get("content"), f"content of edus[{index}]")
        check.own(
            content.get("sender"),
            f"sender of {edu_type} edus[{index}]",
            reasons.TO_DEVICE_SENDER_MISMATCH,
        )
        return
    users = _EDU_USERS.get(edu_type)
    if users is None:
        return
    content = _obj(edu.get("content"), f"content of edus[{index}]")
    for user_id in users(content):
        check.own(user_id, f"user of {edu_type} edus[{index}]", reasons.EDU_USER_MISMATCH)


def _check_transaction(check: _Check, content: Mapping[str, Any]) -> None:
    txn_origin = content.get("origin")
    if not isinstance(txn_origin, str):
        _malformed("transaction has no string origin")
    if txn_origin != check.origin:
        _refuse(
            f"transaction origin {_show(txn_origin)} is not the signing server {check.origin}",
            reasons.ORIGIN_MISMATCH,
        )
    for i, pdu in enumerate(_list(content, "pdus")):
        _check_pdu(check, pdu, i)
    for i, edu in enumerate(_list(content, "edus")):
        _check_edu(check, edu, i)


# --------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------


def _send(check: _Check, params: Mapping[str, str], content: Mapping[str, Any] | None) -> None:
    _check_transaction(check, _obj(content, "transaction"))


def _make(check: _Check, params: Mapping[str, str], content: Mapping[str, Any] | None) -> None:
    check.own(params.get("userId"), "userId", reasons.MEMBERSHIP_USER_MISMATCH)


def _event_body(
    check: _Check, params: Mapping[str, str], content: Mapping[str, Any] | None
) -> None:
    event = _obj(content, "event")
    check.own(event.get("sender"), "event sender", reasons.MEMBERSHIP_USER_MISMATCH)


def _invite_v2(check: _Check, params: Mapping[str, str], content: Mapping[str, Any] | None) -> None:
    event = _obj(_obj(content, "invite").get("event"), "invite event")
    check.own(event.get("sender"), "invite sender", reasons.MEMBERSHIP_USER_MISMATCH)


_Rule = Callable[[_Check, Mapping[str, str], Mapping[str, Any] | None], None]

# Endpoint names as in `sbg.matrix.endpoints`; the v1 forms are listed both
# with and without their `_v1` suffix.
_RULES: Mapping[str, _Rule] = {
    "send": _send,
    "make_join": _make,
    "make_leave": _make,
    "make_knock": _make,
    "send_join": _event_body,
    "send_join_v2": _event_body,
    "send_leave": _event_body,
    "send_leave_v2": _event_body,
    "send_knock": _event_body,
    "invite": _event_body,
    "invite_v2": _invite_v2,
}

CHECKED_ENDPOINTS = frozenset(_RULES)


def check_origin_consistency(
    endpoint_name: str,
    params: Mapping[str, str],
    origin: str,
    content: Mapping[str, Any] | None,
    *,
    internal_servers: frozenset[str],
    external_servers: frozenset[str],
) -> None:
    """Refuse a request whose signing server speaks for someone else.

    Args:
        endpoint_name: `Endpoint.name` of the matched endpoint; endpoints
            without a rule pass.
        params: the decoded path parameters (`userId`, ...).
        origin: the authenticated origin server name.
        content: the parsed JSON body, None when there is none.
        internal_servers: the internal homeservers' server names.
        external_servers: the enabled external homeservers' server names.

    Raises:
        Refusal: 403 `M_FORBIDDEN` with a code from `ORIGIN_REFUSAL_CODES`.
    """
    rule = _RULES.get(endpoint_name)
    if rule is not None:
        rule(_Check(origin, internal_servers, external_servers), params, content)
