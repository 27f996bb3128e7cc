"""moerge.routing: routers (scores in, `Selection` out), the per-call state, per-call `RoutingInputs`,
embedders, diagnostics. Nothing here knows the model layer or the benchmark."""

from moerge.routing.inputs import RoutingInputs
from moerge.routing.router import Router
from moerge.routing.selection import Selection, SelectionConfig, select

__all__ = ["Router", "RoutingInputs", "Selection", "SelectionConfig", "select"]
