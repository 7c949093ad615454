"""Timing, machine description and result files shared by the benchmark suites.

Every comparison is made inside one run on one machine: implementations are timed
back to back on the same inputs and reported as medians and ratios, never against a number
from another run.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

# A run's results go to runs/bench/ (ignored by git), or FLOWKERN_BENCH_OUT: running the
# benchmarks never rewrites the committed reference results in benchmarks/results/.
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS_DIR = os.environ.get("FLOWKERN_BENCH_OUT") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "bench")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str = "cpu", budget_s: float = 0.3,
                min_reps: int = 5, max_reps: int = 2000) -> float:
    """Median seconds per call of fn, after warm-up, over as many calls as fit in budget_s."""
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(max_reps, max(min_reps, budget_s / once)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict, device: str = "cpu", budget_s: float = 0.3, warmup: int = 3,
                        min_turns: int = 5, max_turns: int = 2000) -> dict:
    """Median seconds per call of each fn in fns (name -> (fn, flowkern backend to run it
    under)), after `warmup` calls each. The calls are interleaved, one of each implementation
    in turn, as many turns as fit in about budget_s per implementation: a slow spell of this
    shared machine hits every implementation alike instead of whichever happened to run then."""
    import flowkern  # not at import: common describes machines without the extension too

    def timed(fn, backend):
        with flowkern.backend(backend):
            t0 = time.perf_counter()
            fn()
            sync(device)
            return time.perf_counter() - t0

    for fn, backend in fns.values():
        for _ in range(warmup):
            timed(fn, backend)
    once = sum(timed(fn, backend) for fn, backend in fns.values())
    turns = int(min(max_turns, max(min_turns, budget_s * len(fns) / max(once, 1e-7))))
    times = {name: [] for name in fns}
    for _ in range(turns):
        for name, (fn, backend) in fns.items():
            times[name].append(timed(fn, backend))
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # torch's own kernels' ISA
        "flowkern_cpu_capability": _flowkern_capability(),          # flowkern's CPU kernels' ISA
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


@dataclass
class Row:
    """One measured configuration of one implementation."""
    suite: str
    case: str
    impl: str
    median_us: float
    extra: dict = field(default_factory=dict)


def _flowkern_capability():
    from flowkern import _ext
    return _ext.cpu_capability()


def describe_machine(info: dict) -> str:
    isa = info["cpu_capability"]
    ours = info.get("flowkern_cpu_capability")
    if ours and ours != isa:
        isa += f", flowkern's kernels {ours}"
    where = info.get("gpu") or f"{info['cpu']} ({info['cores']} cores, {isa})"
    return f"{where}; torch {info['torch']}, triton {info.get('triton')}; {info['date']}"


def write_results(name: str, info: dict, rows: list, tables: list[str]) -> tuple[str, str]:
    """JSON (machine + every row) and Markdown (the tables) under RESULTS_DIR (runs/bench/)."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    json_path = os.path.join(RESULTS_DIR, f"{name}.json")
    md_path = os.path.join(RESULTS_DIR, f"{name}.md")
    with open(json_path + ".tmp", "w") as f:
        json.dump({"machine": info, "rows": [asdict(r) for r in rows]}, f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    with open(md_path, "w") as f:
        f.write(f"Machine: {describe_machine(info)}\n\n" + "\n\n".join(tables) + "\n")
    return json_path, md_path


def run_and_write(name: str, info: dict, suite: Callable[[], tuple[list, str]]) -> int:
    """A standalone benchmark's end: runs suite() -> (rows, table), prints the table with the time
    it took, writes results/<name>.json and .md, and says where. Returns the exit status."""
    t0 = time.perf_counter()
    rows, table = suite()
    print(table + f"\n\n({time.perf_counter() - t0:.0f} s)\n", flush=True)
    json_path, md_path = write_results(name, info, rows, [table])
    print(f"results: {json_path}, {md_path}")
    return 0


def markdown_table(header: list[str], body: list[list[object]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


# python -m benchmarks --no-compile turns this off: no torch.compile rows anywhere (inductor's
# build time can exceed a short run's budget, e.g. the GPU check's).
COMPILE = True


def compiled(fn: Callable, **kwargs) -> Optional[Callable]:
    """torch.compile(fn), or None where inductor cannot build here (no C++ compiler, say) or
    compile rows are off (COMPILE).

    A suite calls one compiled op with many sizes, flags and directions: past dynamo's
    recompile limit (8 per function) it would silently run the rest eagerly under the name
    "compile", so the limit is raised."""
    if not COMPILE:
        return None
    try:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    except (ImportError, AttributeError):
        pass
    try:
        return torch.compile(fn, **kwargs)
    except Exception:  # noqa: BLE001 - an unusable compiler is a missing column, not a crash
        return None
