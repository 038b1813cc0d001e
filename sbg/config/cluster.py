"""The `cluster` section: several gateway nodes sharing their kill switch.

```yaml
cluster:
  redis: redis://10.0.0.20:6379/0      # or unix:///run/redis/redis.sock (?db=N),
                                      # or sentinel://s1:26379,s2,s3/service (/db)
  password_file: null
  node_name: gw-a                     # default: the host name
```

The Redis URL carries no credentials (the password lives in
`password_file`, so that the URL can be logged and shown). Whether Redis
answers is not a question for the configuration: a node whose Redis is
down starts with the switches of its `state_dir` (`sbg.cluster`).
"""

from __future__ import annotations

import importlib.util
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from sbg.config import model
from sbg.config.reader import BaseReader, key_path
from sbg.hosts import HostParseError, parse_authority

_CLUSTER_KEYS = ("redis", "password_file", "node_name")
DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
MAX_DB = 65535
_SENTINEL_URL = re.compile(
    r"sentinel://([^/?#]+)/([A-Za-z0-9._-]{1,64})(?:/([0-9]{1,5}))?/?", re.IGNORECASE
)
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_TCP_URL = re.compile(r"redis://([^/?#]*)(?:/([0-9]{1,5}))?/?", re.IGNORECASE)
_UNIX_URL = re.compile(r"unix://(/[^?#]*)(?:\?db=([0-9]{1,5}))?", re.IGNORECASE)
_SHAPES = (
    "redis://host:port/db, unix:///path/to/redis.sock or sentinel://host:port,host:port/service/db"
)

Sentinels = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: `host` and `port`, a `unix_socket`, or the primary
    `service` that `sentinels` name; and the database number."""

    host: str | None
    port: int
    unix_socket: str | None
    db: int
    sentinels: Sentinels = ()
    service: str | None = None


def parse_sentinel_url(text: str) -> tuple[Sentinels, str, int] | None:
    """`sentinel://h1[:port],h2[:port]/service[/db]` as (sentinels, service,
    db); None when it is not a sentinel URL.

    Raises:
        ValueError: a sentinel URL that does not parse.
    """
    if not text.lower().startswith("sentinel://"):
        return None
    if "@" in text:
        raise ValueError("no credentials in the URL: put the password in password_file")
    match = _SENTINEL_URL.fullmatch(text)
    if match is None:
        raise ValueError(f"must be {_SHAPES}, not {text!r}")
    sentinels = []
    for part in match.group(1).split(","):
        try:
            host, port = parse_authority(part)
        except HostParseError as e:
            raise ValueError(f"a sentinel address: {e}") from None
        sentinels.append((host, port or DEFAULT_SENTINEL_PORT))
    return tuple(sentinels), match.group(2), _db(int(match.group(3) or 0))


def parse_redis_url(text: str) -> tuple[str | None, int, str | None, int]:
    """`redis://host[:port][/db]` or `unix:///path[?db=N]` as (host, port,
    socket path, db); host None for a unix socket.

    Raises:
        ValueError: anything else, credentials in the URL included.
    """
    scheme = text.partition("://")[0].lower()
    if scheme == "rediss":
        raise ValueError("TLS to Redis (rediss://) is not supported: use redis:// or unix://")
    if "@" in text:
        raise ValueError("no credentials in the URL: put the password in password_file")
    unix = _UNIX_URL.fullmatch(text)
    if unix is not None:
        path, db = unix.group(1), int(unix.group(2) or 0)
        if "\x00" in path or path.endswith("/"):
            raise ValueError(f"must be {_SHAPES}, not {text!r}")
        return None, DEFAULT_REDIS_PORT, path, _db(db)
    tcp = _TCP_URL.fullmatch(text)
    if tcp is None or not tcp.group(1):
        raise ValueError(f"must be {_SHAPES}, not {text!r}")
    try:
        host, port = parse_authority(tcp.group(1))
    except HostParseError as e:
        raise ValueError(f"must be {_SHAPES}: {e}") from None
    return host, port or DEFAULT_REDIS_PORT, None, _db(int(tcp.group(2) or 0))


def parse_address(text: str) -> RedisAddress:
    """Where the `redis` URL says Redis is (see `parse_redis_url` and
    `parse_sentinel_url`).

    Raises:
        ValueError: not one of those URLs.
    """
    sentinel = parse_sentinel_url(text)
    if sentinel is not None:
        sentinels, service, db = sentinel
        return RedisAddress(None, DEFAULT_REDIS_PORT, None, db, sentinels, service)
    host, port, unix_socket, db = parse_redis_url(text)
    return RedisAddress(host, port, unix_socket, db)


def settings(
    url: str,
    node_name: str,
    address: RedisAddress | None = None,
    password_file: str | None = None,
    password: str | None = None,
) -> model.ClusterSettings:
    """The cluster settings of a valid `redis` URL (parsed unless given)."""
    a = address or parse_address(url)
    return model.ClusterSettings(
        redis=url,
        node_name=node_name,
        host=a.host,
        port=a.port,
        unix_socket=a.unix_socket,
        db=a.db,
        password_file=password_file,
        password=password,
        sentinels=a.sentinels,
        service=a.service,
    )


def _db(db: int) -> int:
    if db > MAX_DB:
        raise ValueError(f"the database number must be between 0 and {MAX_DB}")
    return db


def redis_library_available() -> bool:
    """Whether the Python redis client can be imported (without importing it)."""
    return importlib.util.find_spec("redis") is not None


class ClusterReader(BaseReader):
    """`cluster`: where the Redis is, its password, this node's name."""

    def cluster(self, top: Mapping[str, object]) -> model.ClusterSettings | None:
        """The cluster settings; None when the block is absent (one node)."""
        if top.get("cluster") is None:
            return None
        path = "cluster"
        m = self.mapping(top.get("cluster"), path, _CLUSTER_KEYS)
        if m is None:
            return None
        address = None
        url = self.string(m, "redis", path, required=True)
        if url is not None:
            try:
                address = parse_address(url)
            except ValueError as e:
                self.error(key_path(path, "redis"), str(e))
            else:
                if not redis_library_available():
                    self.error(
                        key_path(path, "redis"),
                        "the Python redis library is not installed (Debian: apt install "
                        "python3-redis; pip: pip install 'sbg[cluster]')",
                    )
        password_file = self.file_path(m, "password_file", path)
        password = None
        if password_file is not None and not self.skip_files:
            password = self.secret(key_path(path, "password_file"), password_file, token=False)
        node_name = self.node_name(m, path)
        if address is None or url is None or node_name is None:
            return None
        return settings(url, node_name, address, password_file, password)

    def node_name(self, m: Mapping[str, object], path: str) -> str | None:
        p = key_path(path, "node_name")
        given = self.string(m, "node_name", path)
        name = given if given is not None else socket.gethostname()
        if _NODE_NAME.fullmatch(name):
            return name
        if given is None:
            self.error(p, f"the host name {name!r} is not a usable node name: set node_name")
        elif not self.has_error(p):
            self.error(
                p,
                "must be 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or "
                f"digit, not {name!r}",
            )
        return None
