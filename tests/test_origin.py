"""Origin consistency (docs/decisions.md, inbound step 20), from the attacker's side."""

from __future__ import annotations

import copy
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sbg.matrix.origin import CHECKED_ENDPOINTS, check_origin_consistency
from sbg.reasons import Refusal

ORIGIN = "hs-ext.test"
INTERNAL = frozenset({"hs-int.test", "hs-int2.test:8448"})
EXTERNAL = frozenset({ORIGIN, "hs-ext2.test"})

ME = "@mallory:hs-ext.test"
INTERNAL_USER = "@alice:hs-int.test"
OTHER_EXTERNAL_USER = "@bob:hs-ext2.test"
UNKNOWN_USER = "@eve:unknown.test"


def _member(sender: str, state_key: str, membership: str, **content: Any) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "room_id": "!room:hs-ext.test",
        "sender": sender,
        "state_key": state_key,
        "content": {"membership": membership, **content},
        "origin_server_ts": 1,
        "depth": 3,
    }


def _message(sender: str) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": "!room:hs-ext.test",
        "sender": sender,
        "content": {"body": "hi", "msgtype": "m.text"},
        "origin_server_ts": 1,
        "depth": 4,
    }


def _tpi() -> dict[str, Any]:
    return {
        "display_name": "a...@example.org",
        "signed": {"mxid": INTERNAL_USER, "token": "abc", "signatures": {}},
    }


def _edus(user: str) -> list[dict[str, Any]]:
    """One of each checked EDU type, every user field naming `user`."""
    return [
        {"edu_type": "m.typing", "content": {"room_id": "!r:x", "user_id": user, "typing": True}},
        {
            "edu_type": "m.receipt",
            "content": {
                "!room:hs-ext.test": {
                    "m.read": {user: {"event_ids": ["$e"], "data": {"ts": 1.5}}},
                },
            },
        },
        {
            "edu_type": "m.presence",
            "content": {"push": [{"user_id": user, "presence": "online", "last_active_ago": 5}]},
        },
        {
            "edu_type": "m.device_list_update",
            "content": {"user_id": user, "device_id": "D", "stream_id": 1, "prev_id": []},
        },
        {"edu_type": "m.signing_key_update", "content": {"user_id": user}},
        {"edu_type": "org.matrix.signing_key_update", "content": {"user_id": user}},
        {
            "edu_type": "m.direct_to_device",
            "content": {
                "sender": user,
                "type": "m.room_key_request",
                "message_id": "m1",
                "messages": {INTERNAL_USER: {"DEVICE": {"x": 1}}},
            },
        },
    ]


def valid_transaction() -> dict[str, Any]:
    """A realistic transaction every rule must let through."""
    return {
        "origin": ORIGIN,
        "origin_server_ts": 1700000000000,
        "pdus": [
            _message(ME),
            _member(ME, ME, "join"),
            # Own user inviting an internal one: naming internal users is normal.
            _member(ME, INTERNAL_USER, "invite"),
            # Relayed joins/leaves/knocks of known servers' users.
            _member(OTHER_EXTERNAL_USER, OTHER_EXTERNAL_USER, "join"),
            _member(INTERNAL_USER, INTERNAL_USER, "leave"),
            _member("@carol:hs-int2.test:8448", "@carol:hs-int2.test:8448", "knock"),
            # A relayed third-party invite by a known external user.
            _member(OTHER_EXTERNAL_USER, INTERNAL_USER, "invite", third_party_invite=_tpi()),
        ],
        "edus": [
            *_edus(ME),
            # Receipts for several rooms and types, all by the origin's users.
            {
                "edu_type": "m.receipt",
                "content": {
                    "!a:hs-int.test": {"m.read": {ME: {}, "@other:hs-ext.test": {}}},
                    "!b:hs-ext.test": {"m.read.private": {ME: {}}},
                },
            },
            # Unknown EDU types pass whatever their content.
            {"edu_type": "org.example.custom", "content": {"user_id": INTERNAL_USER}},
            {"edu_type": "org.example.no_content"},
        ],
    }


class OriginTests(SynchronousTestCase):
    def check(
        self,
        endpoint: str,
        content: Any,
        params: dict[str, str] | None = None,
        origin: str = ORIGIN,
    ) -> None:
        check_origin_consistency(
            endpoint,
            params or {},
            origin,
            content,
            internal_servers=INTERNAL,
            external_servers=EXTERNAL,
        )

    def refused(
        self, code: str, endpoint: str, content: Any, params: dict[str, str] | None = None
    ) -> Refusal:
        e = self.assertRaises(Refusal, self.check, endpoint, content, params)
        self.assertEqual((e.status, e.errcode, e.code), (403, "M_FORBIDDEN", code))
        # Every origin-consistency refusal is one monitor mode may soften.
        self.assertTrue(e.kind.soft, code)
        return e

    # -- /send -------------------------------------------------------------

    def test_valid_transaction_passes(self) -> None:
        self.check("send", valid_transaction(), {"txnId": "t1"})

    def test_empty_transaction_passes(self) -> None:
        self.check("send", {"origin": ORIGIN, "origin_server_ts": 1, "pdus": []})

    def test_transaction_origin(self) -> None:
        for value in ("hs-ext2.test", "HS-EXT.TEST", "hs-ext.test:8448", "hs-int.test"):
            txn = valid_transaction()
            txn["origin"] = value
            self.refused("origin_mismatch", "send", txn)

    def test_pdu_sender_of_other_external_server(self) -> None:
        txn = valid_transaction()
        txn["pdus"].append(_message(OTHER_EXTERNAL_USER))
        self.refused("pdu_sender_mismatch", "send", txn)

    def test_pdu_sender_internal(self) -> None:
        txn = valid_transaction()
        txn["pdus"].append(_message(INTERNAL_USER))
        e = self.refused("impersonates_internal_user", "send", txn)
        self.assertIn(INTERNAL_USER, e.reason)

    def test_pdu_sender_server_compared_exactly(self) -> None:
        # Case and port are part of the server name; the server is
        # everything after the first colon.
        for sender in (
            "@m:HS-EXT.TEST",
            "@m:hs-ext.test:8448",
            "@m:hs-ext.test.evil",
            "@x:y:hs-ext.test",
        ):
            txn = valid_transaction()
            txn["pdus"].append(_message(sender))
            self.refused("pdu_sender_mismatch", "send", txn)
        txn = valid_transaction()
        txn["pdus"].append(_message("@alice:hs-int2.test:8448"))
        self.refused("impersonates_internal_user", "send", txn)

    def test_membership_not_a_relayed_shape(self) -> None:
        cases = [
            # Speaking for someone else: sender != state_key.
            _member(INTERNAL_USER, ME, "join"),
            _member(OTHER_EXTERNAL_USER, ME, "leave"),
            # Ban/invite without third_party_invite are not relayed shapes.
            _member(INTERNAL_USER, INTERNAL_USER, "ban"),
            _member(INTERNAL_USER, "@x:hs-int.test", "invite"),
            _member(INTERNAL_USER, "@x:hs-int.test", "invite", third_party_invite="no"),
            # Not a member event at all.
            {**_member(INTERNAL_USER, INTERNAL_USER, "join"), "type": "m.room.power_levels"},
        ]
        for pdu in cases:
            txn = valid_transaction()
            txn["pdus"].append(pdu)
            sender_internal = pdu["sender"] == INTERNAL_USER
            self.refused(
                "impersonates_internal_user" if sender_internal else "pdu_sender_mismatch",
                "send",
                txn,
            )
        txn = valid_transaction()
        no_content = _member(INTERNAL_USER, INTERNAL_USER, "join")
        del no_content["content"]
        txn["pdus"].append(no_content)
        self.refused("impersonates_internal_user", "send", txn)

    def test_relayed_join_of_unknown_server(self) -> None:
        for pdu in (
            _member(UNKNOWN_USER, UNKNOWN_USER, "join"),
            _member(UNKNOWN_USER, UNKNOWN_USER, "knock"),
            _member(UNKNOWN_USER, INTERNAL_USER, "invite", third_party_invite=_tpi()),
            # A disabled external server is not a trusted one.
            _member("@d:disabled.test", "@d:disabled.test", "join"),
        ):
            txn = valid_transaction()
            txn["pdus"].insert(0, pdu)
            e = self.refused("untrusted_relayed_sender", "send", txn)
            self.assertIn("untrusted relayed sender", e.reason)

    def test_relayed_shapes_of_known_servers_pass(self) -> None:
        for pdu in (
            _member(INTERNAL_USER, INTERNAL_USER, "join"),
            _member(OTHER_EXTERNAL_USER, OTHER_EXTERNAL_USER, "leave"),
            _member(INTERNAL_USER, "@z:hs-ext2.test", "invite", third_party_invite=_tpi()),
        ):
            txn = valid_transaction()
            txn["pdus"] = [pdu]
            self.check("send", txn)

    def _edu_attack(self, edu_index: int, code: str) -> None:
        for user, expected in (
            (OTHER_EXTERNAL_USER, code),
            (UNKNOWN_USER, code),
            (INTERNAL_USER, "impersonates_internal_user"),
        ):
            txn = valid_transaction()
            txn["edus"].append(_edus(user)[edu_index])
            e = self.refused(expected, "send", txn)
            self.assertIn(user, e.reason)

    def test_typing_user(self) -> None:
        self._edu_attack(0, "edu_user_mismatch")

    def test_receipt_user(self) -> None:
        self._edu_attack(1, "edu_user_mismatch")

    def test_receipt_user_hidden_among_own_users(self) -> None:
        txn = valid_transaction()
        txn["edus"].append(
            {
                "edu_type": "m.receipt",
                "content": {
                    "!a:x": {"m.read": {ME: {}}},
                    "!b:x": {"m.read": {ME: {}}, "m.read.private": {ME: {}, INTERNAL_USER: {}}},
                },
            }
        )
        self.refused("impersonates_internal_user", "send", txn)

    def test_presence_user(self) -> None:
        self._edu_attack(2, "edu_user_mismatch")

    def test_presence_user_second_in_push(self) -> None:
        txn = valid_transaction()
        txn["edus"].append(
            {
                "edu_type": "m.presence",
                "content": {"push": [{"user_id": ME}, {"user_id": OTHER_EXTERNAL_USER}]},
            }
        )
        self.refused("edu_user_mismatch", "send", txn)

    def test_device_list_update_user(self) -> None:
        self._edu_attack(3, "edu_user_mismatch")

    def test_signing_key_update_user(self) -> None:
        self._edu_attack(4, "edu_user_mismatch")

    def test_unstable_signing_key_update_user(self) -> None:
        self._edu_attack(5, "edu_user_mismatch")

    def test_to_device_sender(self) -> None:
        self._edu_attack(6, "to_device_sender_mismatch")

    def test_malformed_transactions(self) -> None:
        def txn(**changes: Any) -> dict[str, Any]:
            t = valid_transaction()
            t.update(changes)
            return t

        cases: list[tuple[str, Any]] = [
            ("no body", None),
            ("no origin", {"pdus": []}),
            ("origin not a string", txn(origin=["hs-ext.test"])),
            ("pdus not a list", txn(pdus={"0": _message(ME)})),
            ("edus not a list", txn(edus="x")),
            ("pdu not an object", txn(pdus=[_message(ME), "x"])),
            ("pdu without sender", txn(pdus=[{"type": "m.room.message"}])),
            ("pdu sender not a string", txn(pdus=[{**_message(ME), "sender": 1}])),
            ("pdu sender without colon", txn(pdus=[_message("@mallory")])),
            ("edu not an object", txn(edus=[1])),
            ("edu without type", txn(edus=[{"content": {}}])),
            ("typing without content", txn(edus=[{"edu_type": "m.typing"}])),
            ("typing content a list", txn(edus=[{"edu_type": "m.typing", "content": []}])),
            ("typing without user", txn(edus=[{"edu_type": "m.typing", "content": {}}])),
            (
                "typing user not a string",
                txn(edus=[{"edu_type": "m.typing", "content": {"user_id": [ME]}}]),
            ),
            (
                "receipt room not an object",
                txn(edus=[{"edu_type": "m.receipt", "content": {"!r:x": []}}]),
            ),
            (
                "receipt type not an object",
                txn(edus=[{"edu_type": "m.receipt", "content": {"!r:x": {"m.read": [ME]}}}]),
            ),
            (
                "presence push not a list",
                txn(edus=[{"edu_type": "m.presence", "content": {"push": {}}}]),
            ),
            (
                "presence item not an object",
                txn(edus=[{"edu_type": "m.presence", "content": {"push": [ME]}}]),
            ),
            (
                "to-device without sender",
                txn(edus=[{"edu_type": "m.direct_to_device", "content": {}}]),
            ),
        ]
        for label, content in cases:
            with self.subTest(label=label):
                self.refused("malformed_content", "send", content)

    # -- membership endpoints ---------------------------------------------

    def test_make_membership_user(self) -> None:
        for endpoint in ("make_join", "make_leave", "make_knock"):
            with self.subTest(endpoint=endpoint):
                self.check(endpoint, None, {"roomId": "!r:hs-int.test", "userId": ME})
                for user, code in (
                    (OTHER_EXTERNAL_USER, "membership_user_mismatch"),
                    ("@m:hs-ext.test.evil", "membership_user_mismatch"),
                    (INTERNAL_USER, "impersonates_internal_user"),
                ):
                    self.refused(code, endpoint, None, {"roomId": "!r:hs-int.test", "userId": user})
                self.refused("malformed_content", endpoint, None, {"userId": "nocolon"})

    def test_send_membership_sender(self) -> None:
        names = {
            "join": ("send_join", "send_join_v2"),
            "leave": ("send_leave", "send_leave_v2"),
            "knock": ("send_knock",),
        }
        for membership, endpoints in names.items():
            for endpoint in endpoints:
                with self.subTest(endpoint=endpoint):
                    self.check(endpoint, _member(ME, ME, membership))
                    # A relayed-looking membership is no excuse on these endpoints.
                    self.refused(
                        "membership_user_mismatch",
                        endpoint,
                        _member(OTHER_EXTERNAL_USER, OTHER_EXTERNAL_USER, membership),
                    )
                    self.refused(
                        "impersonates_internal_user",
                        endpoint,
                        _member(INTERNAL_USER, INTERNAL_USER, membership),
                    )
                    self.refused("malformed_content", endpoint, {"type": "m.room.member"})
                    self.refused("malformed_content", endpoint, None)

    def test_invite_v1_sender(self) -> None:
        for endpoint in ("invite",):
            self.check(endpoint, _member(ME, INTERNAL_USER, "invite"))
            self.refused(
                "membership_user_mismatch",
                endpoint,
                _member(OTHER_EXTERNAL_USER, INTERNAL_USER, "invite"),
            )
            self.refused(
                "impersonates_internal_user",
                endpoint,
                _member("@bob:hs-int.test", INTERNAL_USER, "invite"),
            )

    def test_invite_v2_sender(self) -> None:
        def body(event: Any) -> dict[str, Any]:
            return {"event": event, "room_version": "10", "invite_room_state": []}

        self.check("invite_v2", body(_member(ME, INTERNAL_USER, "invite")))
        self.refused(
            "membership_user_mismatch",
            "invite_v2",
            body(_member(OTHER_EXTERNAL_USER, INTERNAL_USER, "invite")),
        )
        self.refused(
            "impersonates_internal_user",
            "invite_v2",
            body(_member("@bob:hs-int.test", INTERNAL_USER, "invite")),
        )
        # The v1 shape (the bare event) on v2 is not an invite body.
        self.refused("malformed_content", "invite_v2", _member(ME, INTERNAL_USER, "invite"))
        self.refused("malformed_content", "invite_v2", body("x"))

    # -- everything else ---------------------------------------------------

    def test_other_endpoints_unchecked(self) -> None:
        hostile = copy.deepcopy(valid_transaction())
        hostile["origin"] = "hs-int.test"
        hostile["pdus"].append(_message(INTERNAL_USER))
        for endpoint in ("get_missing_events", "user_keys_query", "query_profile", "version"):
            self.check(endpoint, hostile, {"userId": INTERNAL_USER})
        self.assertNotIn("get_missing_events", CHECKED_ENDPOINTS)

    def test_checked_endpoint_names(self) -> None:
        self.assertEqual(
            CHECKED_ENDPOINTS,
            {
                "send",
                "make_join",
                "make_leave",
                "make_knock",
                "send_join",
                "send_join_v2",
                "send_leave",
                "send_leave_v2",
                "send_knock",
                "invite",
                "invite_v2",
            },
        )

    def test_checked_names_exist_in_endpoint_table(self) -> None:
        from sbg.matrix.endpoints import ENDPOINTS

        table = {e.name for e in ENDPOINTS}
        # Every endpoint inbound step 20 names has a rule under its table name.
        for name in ("send", "make_join", "make_leave", "make_knock", "send_knock", "invite_v2"):
            self.assertIn(name, table)
        for v1 in ("send_join", "send_leave", "invite"):
            self.assertTrue(v1 in table or f"{v1}_v1" in table)
        for name in table & {"send_join", "send_leave", "invite", "send_join_v2", "send_leave_v2"}:
            self.assertIn(name, CHECKED_ENDPOINTS)
        # And no rule is keyed by a name the table does not have.
        self.assertLessEqual(CHECKED_ENDPOINTS, table)
