"""moerge.routing: routers (scores in, `Selection` out), per-call `RoutingInputs`, embedders, diagnostics."""

from moerge.routing.inputs import RoutingInputs
from moerge.routing.selection import Selection, SelectionConfig, select

__all__ = ["RoutingInputs", "Selection", "SelectionConfig", "select"]
