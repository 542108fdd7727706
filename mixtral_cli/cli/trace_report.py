"""What a routing trace shows in the terminal: `mixtral experts FILE` (the layer x expert usage
heatmap and the reuse rate of consecutive tokens) and `mixtral info --trace FILE` (the cache
simulation: hit rates and bytes per token of each policy at each pool size)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from ..engine.cache_sim import POLICIES, PerLayerLRU, requests, simulate
from ..engine.routing_stats import RoutingStats, routing_stats
from ..engine.trace import PHASES, Trace, TraceError, read_trace
from ..errors import UserError
from ..sizes import format_bytes
from . import ui

if TYPE_CHECKING:  # `mixtral experts` loads no torch
    from ..checkpoints.config import ModelArgs
    from ..engine.plan import MemoryPlan

COLD, GREY, HOT = (40, 70, 170), (70, 70, 70), (200, 50, 30)


def _heat(ratio: float) -> str:
    """A cell's background for a share `ratio` times the uniform one: blue below 1, grey at 1, red
    from 2 on."""
    t = min(max(ratio, 0.0), 2.0)
    a, b, u = (COLD, GREY, t) if t < 1 else (GREY, HOT, t - 1)
    r, g, bl = (round(x + (y - x) * u) for x, y in zip(a, b, strict=True))
    return f"white on rgb({r},{g},{bl})"


def _pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def routing_table(trace: Trace, s: RoutingStats) -> Table:
    h = trace.header
    tokens = "tokens" if s.phase == "all" else f"{s.phase} tokens"
    table = Table(title=f"{h.model} · {s.tokens} {tokens} · top-{h.top_k} of {h.num_experts} experts: "
                        "% of each layer's selections", title_justify="left", pad_edge=False)
    table.add_column("layer", justify="right", style="key")
    for e in range(h.num_experts):
        table.add_column(str(e), justify="right")
    table.add_column("reuse", justify="right")
    uniform = 1 / h.num_experts
    for L, (shares, reuse) in enumerate(zip(s.shares, s.reuse, strict=True)):
        cells = [Text(f"{100 * x:.1f}", style=_heat(x / uniform)) for x in shares]
        table.add_row(str(L), *cells, _pct(reuse))
    return table


def show_routing(path: Path, phase: str, json_out: bool) -> None:
    """`mixtral experts FILE`."""
    if phase != "all" and phase not in PHASES:
        raise UserError(f"--tokens must be all, prefill or decode, got '{phase}'")
    trace = read_trace(path)
    s = routing_stats(trace, phase)
    if json_out:
        ui.print_json({"model": trace.header.model, "num_layers": trace.header.num_layers,
                       "num_experts": trace.header.num_experts, "top_k": trace.header.top_k} | s.as_dict())
        return
    ui.out.print(routing_table(trace, s))
    ui.out.print(f"uniform share {100 / trace.header.num_experts:.1f}% (grey; blue below, red at twice or more) · "
                 f"reuse: share of a token's experts the previous token also used, {_pct(s.mean_reuse)} over "
                 f"{s.pairs} consecutive pairs ({_pct(s.random_reuse)} for random routing)", style="hint")


# -- info --trace: the cache simulation -----------------------------------------------------------
def budget_pool(plan: MemoryPlan) -> int:
    """The slots a pool shared by all layers gets from the plan's budget: all the room the resident
    parts leave, not rounded down to a multiple of the layer count."""
    return int(min(plan.experts_total, max(plan.budget - plan.resident, 0) // plan.expert_bytes))


def check_sizes(args: ModelArgs, slots: list[int], pools: list[int]) -> None:
    """Refuse `--slots K` outside [1, E] and `--pool N` outside [1, L x E]."""
    L, E = args.num_hidden_layers, args.num_local_experts
    for k in slots:
        if not 1 <= k <= E:
            raise UserError(f"--slots {k}: slots per layer must be in [1, {E}]")
    for n in pools:
        if not 1 <= n <= L * E:
            raise UserError(f"--pool {n}: a pool must hold 1 to {L * E} experts (layers x experts)")


def pool_sizes(args: ModelArgs, slots: list[int], pools: list[int], budget: int) -> list[int]:
    """The pool sizes to simulate: L x K for each `--slots K`, each `--pool N`; with neither, L x K
    for K from top-k to all experts, and the plan's `budget` pool."""
    L, E, A = args.num_hidden_layers, args.num_local_experts, args.num_experts_per_tok
    if slots or pools:
        return sorted({L * k for k in slots} | set(pools))
    return sorted({L * k for k in range(A, E + 1)} | ({budget} if budget >= A else set()))


def read_for_model(path: Path, args: ModelArgs) -> Trace:
    """The trace at `path`, refused unless it was recorded with this model's shape."""
    trace = read_trace(path)
    h = trace.header
    if (h.num_layers, h.num_experts, h.top_k) != (args.num_hidden_layers, args.num_local_experts,
                                                   args.num_experts_per_tok):
        raise TraceError(f"{path} was recorded with {h.num_layers} layers x {h.num_experts} experts, top-{h.top_k} "
                         f"({h.model}); this model has {args.num_hidden_layers} x {args.num_local_experts}, "
                         f"top-{args.num_experts_per_tok}", hint="simulate it with the model that recorded it")
    return trace


def cache_simulation(trace: Trace, args: ModelArgs, plan: MemoryPlan, slots: list[int], pools: list[int]) -> dict:
    """Every policy at every pool size over `trace`, as `info --json` reports it."""
    L = trace.header.num_layers
    budget = budget_pool(plan)
    calls = requests(trace)
    results = [simulate(trace, policy, n, calls).as_dict(plan.expert_bytes, L)
               for n in pool_sizes(args, slots, pools, budget) for policy in POLICIES
               if policy != PerLayerLRU.name or n >= L]
    return {"trace": str(trace.path), "model": trace.header.model,
            "tokens": {p: sum(len(x.tokens) for x in trace.passes if x.phase == p) for p in PHASES},
            "expert_bytes": plan.expert_bytes, "budget_slots": budget,
            "not_simulated": ["prefetch", "cpu_experts"], "results": results}


def simulation_tables(sim: dict, layers: int) -> None:
    """One table per phase the trace holds: a row per pool size, a column per policy."""
    for phase in PHASES:
        if not sim["tokens"][phase]:
            continue
        table = Table(title=f"expert cache simulated over {sim['trace']}: {sim['tokens'][phase]} {phase} tokens, "
                            "hit rate and host-to-device bytes per token", title_justify="left", pad_edge=False)
        table.add_column("slots", style="key", justify="right")
        for policy in POLICIES:
            table.add_column(policy, justify="right")
        by_size: dict[int, dict[str, dict]] = {}
        for r in sim["results"]:
            by_size.setdefault(r["slots"], {})[r["policy"]] = r[phase]
        for n, cells in by_size.items():
            label = f"{n} ({n // layers}/layer)" if n % layers == 0 else str(n)
            if n == sim["budget_slots"]:
                label += " budget"
            row = [f"{_pct(c['hit_rate'], 1)} · {format_bytes(c['bytes_per_token'])}" if c else "-"
                   for c in (cells.get(p) for p in POLICIES)]
            table.add_row(label, *row)
        ui.out.print(table)
    ui.out.print(f"one expert {format_bytes(sim['expert_bytes'])}; 'budget': the slots the GPU plan's budget leaves "
                 "for a pool shared by all layers; not simulated: prefetch and --cpu-experts", style="hint")
