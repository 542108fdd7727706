"""What `mixtral bench` reports: the result dataclasses (`BenchResult.as_dict()` is the `--json`
object, field for field) and the slot sweep's CSV and PNG files."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

from ..engine.provider import CacheStats
from .baseline import BaselineInfo
from .measure import RunTimes


@dataclass
class Bandwidth:
    memory_read_bytes_per_s: float
    host_to_device_bytes_per_s: float
    host_to_device_method: str


@dataclass
class HybridBound:
    """With the CPU expert engine: the decode bound when every miss is copied and when the misses are
    split between copies and the CPU, from the measured per-expert costs and miss rate."""

    copy_expert_s: float
    cpu_expert_s: float
    miss_rate: float
    copy_only_tokens_per_s: float
    hybrid_tokens_per_s: float
    cpu_experts: int  # misses computed on the CPU during the timed decode
    mode: str  # --cpu-experts


@dataclass
class Bound:
    """The decode-speed ceiling from the bytes one step reads and the measured bandwidths."""

    weight_bytes_per_token: int
    expert_bytes: int
    misses_per_token: float
    decode_tokens_per_s: float
    achieved_fraction: float  # measured decode tokens/s over the bound
    hybrid: HybridBound | None


@dataclass
class BaselineResult:
    """The transformers baseline's medians next to ours."""

    info: BaselineInfo
    prefill_tokens_per_s: float
    time_to_first_token_s: float
    decode_tokens_per_s: float
    prefill_ratio: float  # ours / theirs
    decode_ratio: float

    @classmethod
    def compare(cls, info: BaselineInfo, ours: RunTimes, theirs: RunTimes) -> BaselineResult:
        return cls(info, theirs.prefill_tokens_per_s, theirs.ttft_s, theirs.decode_tokens_per_s,
                   ours.prefill_tokens_per_s / theirs.prefill_tokens_per_s,
                   ours.decode_tokens_per_s / theirs.decode_tokens_per_s)

    def as_dict(self) -> dict:
        return asdict(self.info) | {f.name: getattr(self, f.name) for f in fields(self) if f.name != "info"}


@dataclass
class SweepRow:
    """Decode with one slot count per layer (`--sweep-slots`)."""

    slots_per_layer: int
    decode_tokens_per_s: float
    hit_rate: float | None
    misses_per_token: float
    prefetch_accuracy: float | None
    bytes_to_device: int
    stall_s: float
    bound_tokens_per_s: float


@dataclass
class BenchResult:
    """One `mixtral bench` run. The fields are the `--json` keys, in order."""

    model: str  # "preset:NAME" or the checkpoint directory
    synthetic: bool
    note: str | None
    bits: int
    expert_format: str
    attn_bits: int  # 16: bfloat16
    output_bits: int
    device: str
    dtype: str
    threads: int
    params_total: int
    params_active: int
    slots_per_layer: int
    prefetch: bool
    prompt_tokens: int
    gen_tokens: int
    warmup_tokens: int
    rounds: int
    load_s: float
    prefill_tokens_per_s: float
    time_to_first_token_s: float
    decode_tokens_per_s: float
    decode_ms_per_token: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    peak_gpu_reserved_bytes: int | None
    expert_cache: CacheStats  # the timed decode steps
    prefill_expert_cache: CacheStats
    bandwidth: Bandwidth
    bound: Bound
    baseline: BaselineResult | None = None
    sweep: list[SweepRow] | None = None
    sweep_csv: str | None = None  # with a sweep only, like sweep_png
    sweep_png: str | None = None  # None when matplotlib is missing

    def as_dict(self) -> dict:
        """The `--json` object (`sweep_csv` and `sweep_png` only with a sweep)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        if self.sweep is None:
            del out["sweep_csv"], out["sweep_png"]
        return out


def _plain(value: object) -> object:
    """JSON-ready: an object's own `as_dict()` where it has one, dataclasses as dicts, lists item by item."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# -- the sweep's files -----------------------------------------------------------------------------
SWEEP_FIELDS = tuple(f.name for f in fields(SweepRow))


def write_sweep_csv(rows: list[SweepRow], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SWEEP_FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in asdict(row).items()})


def write_sweep_png(rows: list[SweepRow], path: Path) -> str | None:
    """A chart of tokens/s and hit rate per slot count, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ks = [r.slots_per_layer for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [r.decode_tokens_per_s for r in rows], "o-", label="decode tokens/s")
    ax.plot(ks, [r.bound_tokens_per_s for r in rows], "--", label="bound")
    ax.set_xlabel("expert slots per layer")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.plot(ks, [r.hit_rate or 0 for r in rows], "s:", color="gray", label="hit rate")
    ax2.set_ylabel("hit rate")
    ax2.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
