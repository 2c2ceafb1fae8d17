"""Falcon-H1: FalconH1MLP = down(up(x) * act(gate(x) * gate_multiplier)) * down_multiplier.
find_sites finds 0 of 2; show the graph nodes between gate_proj and silu."""
import sys, torch, countdown_fx
sys.path.insert(0, "/tmp/audit_arch")
from common import build, ids
from countdown_fx.capture import capture_graphs
m = build("falcon_h1")
print("mlp_multipliers:", m.config.mlp_multipliers)
print(countdown_fx.find_sites(m, ids()))
for gm, _ in capture_graphs(m, ids()):
    for n in gm.graph.nodes:
        if n.op == "call_function" and "silu" in str(n.target):
            a = n.args[0]
            print("silu input:", a.format_node()); print("   its input:", a.args[0].format_node() if hasattr(a.args[0], 'format_node') else a.args[0]); break
