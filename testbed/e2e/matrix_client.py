"""A small synchronous Matrix client-server API client for the end-to-end scenarios.

Plain urllib, no proxy, every call bounded by a timeout; every wait loop has a
deadline. Raises MatrixError for any non-2xx answer.
"""

import base64
import hashlib
import hmac
import itertools
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import nacl.public
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json

T = TypeVar("T")

REQUEST_TIMEOUT = 30.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MatrixError(Exception):
    """A non-2xx answer from a homeserver."""

    def __init__(self, method: str, url: str, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        self.errcode = body.get("errcode") if isinstance(body, dict) else None
        super().__init__(f"{method} {url} -> {status} {body!r}")


def q(value: str) -> str:
    """Quote one path segment (room ids, user ids, aliases)."""
    return urllib.parse.quote(value, safe="")


def request(
    method: str,
    url: str,
    *,
    body: Any = None,
    raw: bytes | None = None,
    content_type: str | None = None,
    token: str | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; returns (status, headers, body) or raises MatrixError."""
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        content_type = content_type or "application/json"
    req = urllib.request.Request(url, data=data, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            decoded: Any = json.loads(payload)
        except ValueError:
            decoded = payload.decode("utf-8", "replace")
        raise MatrixError(method, url, e.code, decoded) from None


def wait_until(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call FN until it returns something other than None; bounded by TIMEOUT."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _unpadded_b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


class MatrixClient:
    """A logged-in user on one homeserver's client API."""

    def __init__(self, base_url: str, user_id: str, access_token: str, device_id: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.user_id = user_id
        self.access_token = access_token
        self.device_id = device_id
        self.next_batch: str | None = None
        self.password: str | None = None
        self.retries = 0  # retries spent on known transient answers (see query_keys)
        self._txn = itertools.count()

    # -- account

    @classmethod
    def register(
        cls,
        base_url: str,
        shared_secret: str,
        localpart: str,
        password: str,
        admin: bool = False,
    ) -> "MatrixClient":
        """Create a user with the shared-secret admin API and return its client."""
        url = base_url.rstrip("/") + "/_synapse/admin/v1/register"
        _, _, raw = request("GET", url)
        nonce = json.loads(raw)["nonce"]
        mac = hmac.new(shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                [
                    nonce.encode(),
                    localpart.encode(),
                    password.encode(),
                    b"admin" if admin else b"notadmin",
                ]
            )
        )
        _, _, raw = request(
            "POST",
            url,
            body={
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            },
        )
        answer = json.loads(raw)
        client = cls(base_url, answer["user_id"], answer["access_token"], answer["device_id"])
        client.password = password
        return client

    @classmethod
    def login(cls, base_url: str, user: str, password: str) -> "MatrixClient":
        """Password login (USER is a localpart or a full user id)."""
        _, _, raw = request(
            "POST",
            base_url.rstrip("/") + "/_matrix/client/v3/login",
            body={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user},
                "password": password,
            },
        )
        answer = json.loads(raw)
        return cls(base_url, answer["user_id"], answer["access_token"], answer["device_id"])

    # -- plumbing

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Any:
        """A JSON API call; PATH starts with /_matrix/... ; returns the decoded body."""
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        _, _, raw = request(method, url, body=body, token=self.access_token, timeout=timeout)
        return json.loads(raw) if raw else {}

    def _c(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        return self.call(method, "/_matrix/client/v3" + path, body, **kw)

    def whoami(self) -> Any:
        return self._c("GET", "/account/whoami")

    # -- rooms

    def create_room(
        self,
        *,
        preset: str = "private_chat",
        invite: list[str] | None = None,
        name: str | None = None,
        alias_localpart: str | None = None,
        public: bool = False,
        extra: dict[str, Any] | None = None,
        access_rule: str | None = None,
    ) -> str:
        """POST /createRoom; ACCESS_RULE sets the room's class (Tchap's
        im.vector.room.access_rules: restricted, unrestricted or direct)."""
        body: dict[str, Any] = {"preset": preset, "visibility": "public" if public else "private"}
        if access_rule is not None:
            body["initial_state"] = [
                {
                    "type": "im.vector.room.access_rules",
                    "state_key": "",
                    "content": {"rule": access_rule},
                }
            ]
        if invite:
            body["invite"] = invite
        if name:
            body["name"] = name
        if alias_localpart:
            body["room_alias_name"] = alias_localpart
        body.update(extra or {})
        return str(self._c("POST", "/createRoom", body)["room_id"])

    def invite(self, room_id: str, user_id: str) -> None:
        self._c("POST", f"/rooms/{q(room_id)}/invite", {"user_id": user_id})

    def join(self, room_id_or_alias: str, via: list[str] | None = None) -> str:
        params = {"server_name": via} if via else None
        answer = self._c("POST", f"/join/{q(room_id_or_alias)}", {}, params=params)
        return str(answer["room_id"])

    def knock(self, room_id_or_alias: str, via: list[str] | None = None) -> str:
        params = {"via": via} if via else None
        answer = self._c("POST", f"/knock/{q(room_id_or_alias)}", {}, params=params)
        return str(answer["room_id"])

    def invite_3pid(
        self, room_id: str, address: str, id_server: str, id_access_token: str = "token"
    ) -> None:
        """Invite an email address (a third-party invite through ID_SERVER)."""
        self._c(
            "POST",
            f"/rooms/{q(room_id)}/invite",
            {
                "medium": "email",
                "address": address,
                "id_server": id_server,
                "id_access_token": id_access_token,
            },
        )

    def redact(self, room_id: str, event_id: str, reason: str = "") -> str:
        txn = f"e2e{time.time_ns()}.{next(self._txn)}"
        body = {"reason": reason} if reason else {}
        answer = self._c("PUT", f"/rooms/{q(room_id)}/redact/{q(event_id)}/{txn}", body)
        return str(answer["event_id"])

    def state(self, room_id: str) -> list[Any]:
        """Every current state event of the room (with event ids)."""
        return list(self._c("GET", f"/rooms/{q(room_id)}/state"))

    def state_content(self, room_id: str, event_type: str, state_key: str = "") -> Any:
        """The content of one state event; None when there is none."""
        try:
            return self._c("GET", f"/rooms/{q(room_id)}/state/{q(event_type)}/{q(state_key)}")
        except MatrixError as e:
            if e.status == 404:
                return None
            raise

    def membership(self, room_id: str, user_id: str) -> str | None:
        content = self.state_content(room_id, "m.room.member", user_id)
        return None if content is None else str(content.get("membership"))

    def set_room_visibility(self, room_id: str, visibility: str) -> None:
        """Publish (public) or unpublish (private) the room in the room directory."""
        self._c("PUT", f"/directory/list/room/{q(room_id)}", {"visibility": visibility})

    def leave(self, room_id: str) -> None:
        self._c("POST", f"/rooms/{q(room_id)}/leave", {})

    def send_message(self, room_id: str, body: str, msgtype: str = "m.text") -> str:
        txn = f"e2e{time.time_ns()}.{next(self._txn)}"
        answer = self._c(
            "PUT",
            f"/rooms/{q(room_id)}/send/m.room.message/{txn}",
            {"msgtype": msgtype, "body": body},
        )
        return str(answer["event_id"])

    def send_state(self, room_id: str, event_type: str, content: Any, state_key: str = "") -> str:
        answer = self._c(
            "PUT", f"/rooms/{q(room_id)}/state/{q(event_type)}/{q(state_key)}", content
        )
        return str(answer["event_id"])

    def joined_members(self, room_id: str) -> list[str]:
        return sorted(self._c("GET", f"/rooms/{q(room_id)}/joined_members")["joined"])

    def joined_rooms(self) -> list[str]:
        return list(self._c("GET", "/joined_rooms")["joined_rooms"])

    def messages(
        self, room_id: str, direction: str = "b", limit: int = 100, start: str | None = None
    ) -> Any:
        params: dict[str, Any] = {"dir": direction, "limit": limit}
        if start is not None:
            params["from"] = start
        return self._c("GET", f"/rooms/{q(room_id)}/messages", params=params)

    def message_bodies(self, room_id: str, max_pages: int = 20) -> list[tuple[str, str]]:
        """(sender, body) of the room's m.room.message events, oldest first.

        Pages backwards through the whole room (at most MAX_PAGES pages of 100).
        """
        events: list[Any] = []
        start: str | None = None
        for _ in range(max_pages):
            page = self.messages(room_id, "b", 100, start)
            events.extend(page["chunk"])
            if not page["chunk"] or not page.get("end"):
                break
            start = page["end"]
        return [
            (e["sender"], e["content"].get("body", ""))
            for e in reversed(events)
            if e.get("type") == "m.room.message"
        ]

    # -- sync

    def sync(self, timeout_ms: int = 0, full_state: bool = False) -> Any:
        """One /sync from the last position; remembers next_batch."""
        params: dict[str, Any] = {
            "timeout": timeout_ms,
            "filter": json.dumps({"presence": {"types": []}, "room": {"timeline": {"limit": 50}}}),
        }
        if self.next_batch:
            params["since"] = self.next_batch
        if full_state:
            params["full_state"] = "true"
        answer = self._c("GET", "/sync", params=params, timeout=REQUEST_TIMEOUT + timeout_ms / 1000)
        self.next_batch = answer["next_batch"]
        return answer

    def wait_for_sync(self, pick: Callable[[Any], T | None], timeout: float, what: str) -> T:
        """Long-poll /sync until PICK(response) is not None (bounded by TIMEOUT)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            answer = self.sync(timeout_ms=int(max(0.0, min(2.0, remaining)) * 1000))
            found = pick(answer)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.user_id}: timed out after {timeout}s waiting for {what}"
                )

    def wait_for_invite(self, room_id: str, timeout: float = 30.0) -> Any:
        """Wait until ROOM_ID appears under rooms.invite; return its invite_state."""
        return self.wait_for_sync(
            lambda a: a.get("rooms", {}).get("invite", {}).get(room_id, {}).get("invite_state"),
            timeout,
            f"an invite to {room_id}",
        )

    def wait_for_bodies(
        self, room_id: str, bodies: list[str], timeout: float = 30.0
    ) -> list[tuple[str, str]]:
        """Wait until every one of BODIES is in the room; return all (sender, body), oldest first."""

        def check() -> list[tuple[str, str]] | None:
            seen = self.message_bodies(room_id)
            present = {b for _, b in seen}
            return seen if all(b in present for b in bodies) else None

        return wait_until(check, timeout, f"{self.user_id} to see {bodies} in {room_id}")

    def wait_for_members(
        self, room_id: str, members: list[str], timeout: float = 30.0
    ) -> list[str]:
        def check() -> list[str] | None:
            try:
                joined = self.joined_members(room_id)
            except MatrixError:
                return None
            return joined if all(m in joined for m in members) else None

        return wait_until(check, timeout, f"{members} joined in {room_id}")

    # -- profile and directory

    def get_profile(self, user_id: str) -> Any:
        return self._c("GET", f"/profile/{q(user_id)}")

    def set_displayname(self, name: str) -> None:
        self._c("PUT", f"/profile/{q(self.user_id)}/displayname", {"displayname": name})

    def resolve_alias(self, alias: str) -> Any:
        return self._c("GET", f"/directory/room/{q(alias)}")

    def public_rooms(self, server: str | None = None) -> Any:
        return self._c("GET", "/publicRooms", params={"server": server} if server else None)

    # -- end-to-end encryption keys

    def make_device_keys(self, one_time_keys: int = 2) -> tuple[dict[str, Any], dict[str, Any]]:
        """Signed device keys and signed curve25519 one-time keys for this device."""
        signing = generate_signing_key(self.device_id)
        curve = nacl.public.PrivateKey.generate().public_key
        device_keys = {
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                f"curve25519:{self.device_id}": _unpadded_b64(bytes(curve)),
                f"ed25519:{self.device_id}": encode_verify_key_base64(get_verify_key(signing)),
            },
        }
        device_keys = sign_json(device_keys, self.user_id, signing)
        otks = {}
        for i in range(one_time_keys):
            key = nacl.public.PrivateKey.generate().public_key
            otk = sign_json({"key": _unpadded_b64(bytes(key))}, self.user_id, signing)
            otks[f"signed_curve25519:AAAAA{i}"] = otk
        return device_keys, otks

    def upload_keys(
        self, device_keys: dict[str, Any] | None, one_time_keys: dict[str, Any] | None
    ) -> Any:
        body: dict[str, Any] = {}
        if device_keys is not None:
            body["device_keys"] = device_keys
        if one_time_keys is not None:
            body["one_time_keys"] = one_time_keys
        return self._c("POST", "/keys/upload", body)

    def query_keys(self, user_ids: list[str], deadline: float = 20.0) -> Any:
        """POST /keys/query; retries Synapse's transient 503 (device-list resync race)."""

        def attempt() -> Any:
            try:
                return self._c(
                    "POST",
                    "/keys/query",
                    {"device_keys": {u: [] for u in user_ids}, "timeout": 10000},
                )
            except MatrixError as e:
                if e.status == 503:
                    self.retries += 1
                    return None
                raise

        return wait_until(attempt, deadline, f"keys/query for {user_ids}", interval=0.5)

    def claim_keys(self, user_id: str, device_id: str, algorithm: str = "signed_curve25519") -> Any:
        return self._c(
            "POST",
            "/keys/claim",
            {"one_time_keys": {user_id: {device_id: algorithm}}, "timeout": 10000},
        )

    # -- media

    def upload_media(
        self, data: bytes, content_type: str = "application/octet-stream", filename: str = "f"
    ) -> str:
        """Upload DATA; returns its mxc:// URI."""
        url = (
            self.base_url
            + "/_matrix/media/v3/upload?"
            + urllib.parse.urlencode({"filename": filename})
        )
        _, _, raw = request(
            "POST", url, raw=data, content_type=content_type, token=self.access_token
        )
        return str(json.loads(raw)["content_uri"])

    def download_media(self, mxc: str, timeout: float = REQUEST_TIMEOUT) -> tuple[str, bytes]:
        """Authenticated download of MXC; returns (content type, bytes)."""
        if not mxc.startswith("mxc://"):
            raise ValueError(f"not an mxc URI: {mxc}")
        server, media_id = mxc[len("mxc://") :].split("/", 1)
        url = f"{self.base_url}/_matrix/client/v1/media/download/{q(server)}/{q(media_id)}"
        _, headers, raw = request("GET", url, token=self.access_token, timeout=timeout)
        return headers.get("Content-Type", ""), raw
