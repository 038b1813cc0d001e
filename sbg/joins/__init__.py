"""The joins the internal homeservers prepared (`make_join` answered 200),
shared by every worker of a node through `state_dir/joins`."""

from sbg.joins.store import PreparedJoins

__all__ = ["PreparedJoins"]
