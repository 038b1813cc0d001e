"""What a gateway process needs for its kill switch: a `SwitchControl`
for the admin API, and with a `cluster` block the `ClusterKillSwitch`
(whose `cluster_state` `/health` adds, and whose `status` is the
`"cluster"` section of `GET /_sbg/status`)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from sbg import __version__
from sbg.cluster.link import Announcement
from sbg.cluster.sync import ClusterKillSwitch
from sbg.config.model import Config
from sbg.killswitch.control import LocalControl, SwitchControl
from sbg.killswitch.switch import KillSwitch
from sbg.metrics import Metrics


def control_for(
    config: Config,
    killswitch: KillSwitch,
    reactor: Any,
    metrics: Metrics,
    sections: dict[str, Callable[[], object]],
    *,
    worker: bool = False,
) -> tuple[SwitchControl, ClusterKillSwitch | None]:
    """The admin API's control of `killswitch`, and the cluster's part (None
    for a node alone, and in a worker: its supervisor holds the admin API
    and the link to Redis), whose status becomes the `"cluster"` one of
    `sections` (`GET /_sbg/status`). The cluster's part is not started yet."""
    if config.cluster is None or worker:
        return LocalControl(killswitch), None
    metrics.enable_cluster()
    announcement = Announcement(
        node=config.cluster.node_name,
        config_sha256=config.sha256,
        version=__version__,
        workers=config.workers,
        instance=secrets.token_hex(8),
        started_ts=int(time.time() * 1000),
    )
    problems = metrics.killswitch_errors
    cluster = ClusterKillSwitch(
        killswitch,
        config.cluster,
        reactor,
        announcement,
        on_problem=lambda kind: problems.labels(kind).inc(),
        on_connected=lambda up: metrics.cluster_connected.set(1 if up else 0),
    )
    sections["cluster"] = cluster.status
    return cluster, cluster
