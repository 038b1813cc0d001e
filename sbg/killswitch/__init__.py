"""The kill switch: runtime state that stops federation, per server and
direction or for everyone, and that no fault may lift.

- `state`: the switches as values, and their JSON form (pure);
- `store`: the state file in `state_dir` (write-then-rename, fsync);
- `shared`: the memory a supervisor shares with its workers;
- `switch`: `KillSwitch`, what the gateway and the admin API use.
"""
