"""Several gateway nodes, one kill switch: shared through Redis.

- `records`: a switch's last change as Redis holds it (engaged or lifted,
  with a version), and which of two records is newer (pure);
- `plan`: what a node does with what Redis holds (pure);
- `ledger`: what a node knows of the cluster's records
  (`state_dir/cluster.json`);
- `nodes`: the nodes' announcements (pure);
- `link`: the thread that owns the blocking Redis client;
- `sync`: `ClusterKillSwitch`, the reactor's side, around the node's
  `KillSwitch`;
- `wiring`: what a gateway process builds from its configuration;
- `joins`: `SharedJoins`, the joins every node prepared (`make_join`
  answered), so that a `send_join` may reach another node.

Redis data model (one Redis database per cluster):

- `sbg:killswitch`, a hash: field `["server-or-null", "direction"]`, value
  a JSON record `{"server", "direction", "state": "engaged"|"lifted",
  "version", "ts", "node", "by", "reason", "since_ts"}`. A lift is kept as
  a record (a tombstone): one per switch ever changed, a few hundred at
  most.
- `sbg:nodes`, a hash: field the node name, value its announcement
  `{"node", "config_sha256", "version", "workers", "started_ts",
  "last_seen_ts", "instance"}`, written every 5 s.
- `sbg:join:KEY`, a string with a 10-minute expiry: a prepared join.

Rules, which together never open the border on a fault:

1. A change made through a node's admin API takes, in one Redis
   transaction, the version above every version its switch had in Redis or
   on that node. An engage is in force on that node before anything else
   (and stays so whatever Redis does); a lift is in force nowhere until
   Redis holds it.
2. A node applies a record from Redis only when it is newer than the one
   it knows (higher version; at equal versions, engaged wins). Nothing
   else lifts: a missing record (Redis restarted empty, flushed, or an
   entry deleted), an older or malformed one, or Redis unreachable.
3. What a node knows and Redis lacks or holds older, it writes again
   (Redis lost its data: the switches come back from the nodes).
4. Engages made while Redis was unreachable from a node stay pending
   there and go to Redis as new changes when it answers: above any lift
   made meanwhile. So after a partition every node converges on the union
   of what was engaged meanwhile, minus what was lifted through Redis
   afterwards.

Every node polls Redis every 0.25 s, so a change holds on every node
within about 0.3 s while Redis answers (and on every worker of a node at
once: the supervisor publishes it in the memory its workers read).
"""
