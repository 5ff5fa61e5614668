"""What the dycon benchmarks share: timing, peak memory, OOM handling, header, table, CSV, plot.

A benchmark describes one *case* (a backend at one size) by a picklable function
``make_case(spec, device) -> Case``; :func:`measure` turns it into a :class:`Result`:

- time: the median over repeats (after warm-up) of the forward, the backward alone
  (``backward(retain_graph=True)`` on one forward's graph) and forward + backward, in ms.
  CUDA times come from CUDA events after a synchronisation; CPU times from ``perf_counter``.
  Repeats shrink to fit ``Timing.budget_s`` per measurement (at least 3; 1 for a call slower
  than the whole budget).
- peak memory of one forward + backward, in MiB, *above what the inputs already hold*:
  on CUDA ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` after the inputs
  were made and one full-size warm-up call (Triton compiles and autotunes there). On the CPU
  (no allocator statistics) each case runs in a fresh process, forked from a server that has
  imported torch but never computed anything, and the figure is the growth of the process's
  peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over its resident set
  once the inputs exist; a small warm-up call first loads code pages and thread pools, and
  glibc is told to return freed blocks at once. Where ``clear_refs`` is not writable,
  ``ru_maxrss`` is the fallback, noted in the header.
- OOM: a CUDA out-of-memory error, a CPU ``MemoryError`` / failed allocation, or a child killed
  by the kernel shows as ``OOM``; the CPU cap (``--mem-cap-gb``) is an address-space limit set in
  the child after its inputs exist. Other exceptions show as ``error`` (details after the table).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(1, ROOT)

from dycon_kernels._build import source_commit  # noqa: E402  (after the path above)

MiB = 2.0 ** 20
GiB = 2.0 ** 30
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


# --------------------------------------------------------------------------- cases and results

@dataclasses.dataclass
class Case:
    """One runnable benchmark case: ``forward()`` returns a scalar loss; ``leaves`` get grads."""
    forward: Callable[[], torch.Tensor]
    leaves: Sequence[torch.Tensor]

    def zero_grad(self):
        for t in self.leaves:
            t.grad = None

    def step(self):
        self.zero_grad()
        self.forward().backward()


@dataclasses.dataclass
class Result:
    status: str = "ok"             # ok | OOM | skipped (...) | error | timeout | n/a
    fwd_ms: Optional[float] = None
    bwd_ms: Optional[float] = None
    full_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclasses.dataclass
class Timing:
    warmup: int = 2          # untimed calls before timing
    repeats: int = 10        # timed calls (at most)
    budget_s: float = 3.0    # fewer repeats (at least 3) when one call is slow
    threads: Optional[int] = None  # CPU: torch.set_num_threads in each case's process


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                   "not enough memory", "std::bad_alloc"))


# --------------------------------------------------------------------------- timing

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, timing: Timing,
              before: Optional[Callable[[], object]] = None) -> float:
    """Median wall time of ``fn()`` in ms; ``before()`` runs untimed ahead of every call."""
    def once() -> float:
        if before is not None:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _sync(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    first = [once() for _ in range(max(timing.warmup, 1))][-1]
    repeats = timing.repeats
    if first > timing.budget_s * 1e3:
        repeats = 1  # one call already exceeds the budget: a single timed call
    elif first > 0:
        repeats = max(3, min(repeats, int(timing.budget_s * 1e3 / first)))
    return statistics.median(once() for _ in range(repeats))


def _time_case(case: Case, device: torch.device, timing: Timing) -> tuple[float, float, float]:
    fwd = median_ms(case.forward, device, timing)
    loss = case.forward()
    bwd = median_ms(lambda: loss.backward(retain_graph=True), device, timing, before=case.zero_grad)
    del loss
    case.zero_grad()
    full = median_ms(lambda: case.forward().backward(), device, timing, before=case.zero_grad)
    return fwd, bwd, full


# --------------------------------------------------------------------------- CPU memory

def _proc_status_kib(field: str) -> Optional[int]:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_memory_method() -> str:
    exact = os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)
    how = ("peak RSS (VmHWM, reset via /proc/self/clear_refs)" if exact
           else "ru_maxrss (the process high-water mark; may read low after a larger warm-up)")
    return (f"CPU peak memory = growth of {how} over the RSS after inputs are created, "
            "one fresh forked process per case (glibc mmap threshold fixed at 128 KiB, malloc_trim "
            "before the baseline), after a small warm-up call")


def _libc():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _plain_malloc():
    """Make glibc hand every freed block of 128 KiB or more back to the OS at once, so the RSS
    follows the live tensors (glibc otherwise raises its mmap threshold after the first large
    free and keeps up to 32 MiB blocks on its heap, hiding later allocations from the RSS)."""
    libc = _libc()
    if libc is not None:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    return libc


def _measure_cpu_child(make_case, spec, warm_spec, timing: Timing, mem_cap: Optional[float]) -> Result:
    device = torch.device("cpu")
    if timing.threads:
        torch.set_num_threads(timing.threads)
    libc = _plain_malloc()
    if warm_spec is not None:
        _ = make_case(warm_spec, device).step()
    case = make_case(spec, device)
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    base_rss = _proc_status_kib("VmRSS") * 1024
    exact = _reset_peak_rss()
    base_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if mem_cap:
        vm = _proc_status_kib("VmSize") * 1024
        limit = int(vm + mem_cap)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    case.step()
    if exact:
        peak = _proc_status_kib("VmHWM") * 1024 - base_rss
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(base_hwm, base_rss)
    case.zero_grad()
    fwd, bwd, full = _time_case(case, device, timing)
    return Result("ok", fwd, bwd, full, max(peak, 0) / MiB)


def _child_entry(conn, make_case, spec, warm_spec, timing, mem_cap):
    try:
        result = _measure_cpu_child(make_case, spec, warm_spec, timing, mem_cap)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        result = Result("OOM" if _is_oom(exc) else "error",
                        error="".join(traceback.format_exception_only(type(exc), exc)).strip())
    conn.send(result)
    conn.close()


_CTX = None


def _mp_context():
    """Children fork from a server that imported torch and dycon_kernels but ran nothing."""
    global _CTX
    if _CTX is None:
        try:
            _CTX = mp.get_context("forkserver")
            _CTX.set_forkserver_preload(["torch", "dycon_kernels"])
        except ValueError:
            _CTX = mp.get_context("spawn")
    return _CTX


# --------------------------------------------------------------------------- measure

def measure(make_case, spec, device: torch.device, timing: Timing, *, warm_spec=None,
            mem_cap: Optional[float] = None, case_timeout: float = 900.0) -> Result:
    """Time and peak memory of one case; never raises for OOM or a failing backend."""
    if device.type == "cpu":
        ctx = _mp_context()
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_entry, args=(send, make_case, spec, warm_spec, timing, mem_cap))
        proc.start()
        send.close()
        try:
            if recv.poll(case_timeout):
                result = recv.recv()
            else:
                result = Result("timeout", error=f"no result after {case_timeout:.0f} s")
        except EOFError:
            proc.join(5)
            code = proc.exitcode
            result = Result("OOM" if code in (-9, 137) else "error",
                            error=f"child process died (exit code {code})")
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()
        return result

    case = None
    try:
        case = make_case(spec, device)
        # A full-size warm-up first: Triton compiles and autotunes on the first call of a shape,
        # and the autotuner's buffers must not count. The exact CUDA statistics are reset after.
        case.step()
        case.zero_grad()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        case.step()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / MiB
        case.zero_grad()
        fwd, bwd, full = _time_case(case, device, timing)
        return Result("ok", fwd, bwd, full, peak)
    except Exception as exc:  # noqa: BLE001
        return Result("OOM" if _is_oom(exc) else "error",
                      error="".join(traceback.format_exception_only(type(exc), exc)).strip())
    finally:
        del case
        gc.collect()
        torch.cuda.empty_cache()


def available_memory(device: torch.device, mem_cap: Optional[float]) -> float:
    """Bytes a case may use: free GPU memory, or the CPU cap (default: available RAM)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    if mem_cap:
        return mem_cap
    from dycon_kernels.backends import free_memory
    return float(free_memory(device) or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


# --------------------------------------------------------------------------- GPU rates

def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), from a large ``copy_``."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, Timing(warmup=3, repeats=20, budget_s=2.0))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """Achievable dense matmul flop/s of this card in ``dtype`` (float32 measured as TF32)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = median_ms(lambda: a @ b, device, Timing(warmup=3, repeats=10, budget_s=2.0))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * n ** 3 / (ms * 1e-3)


def exp_rate(device: torch.device) -> tuple[float, str]:
    """Nominal exp throughput (SFU: 16 per SM per clock on sm_80/sm_90) and how it was derived."""
    props = torch.cuda.get_device_properties(device)
    clock_hz = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits",
                              "-i", str(device.index or 0)], capture_output=True, text=True, timeout=20)
        clock_hz = float(out.stdout.strip().splitlines()[0]) * 1e6
    except Exception:  # noqa: BLE001
        pass
    if clock_hz is None:
        clock_hz = float(getattr(props, "clock_rate", 1_755_000)) * 1e3
    sms = props.multi_processor_count
    return sms * clock_hz * 16, f"{sms} SMs x {clock_hz / 1e9:.2f} GHz x 16 exp/clk/SM (nominal)"


# --------------------------------------------------------------------------- header

def _load_average() -> str:
    """The 1/5/15-minute load averages: timings on a shared machine need them."""
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


class OtherCpu:
    """``with OtherCpu() as other:`` -> ``other.cores``: the CPU that other processes used while the
    block ran, in cores on average (``/proc/stat``'s busy time minus this process's). A 2-thread
    wall time on a 2-core machine means something only when this is near 0: one busy core makes
    every parallel region wait for the descheduled thread. None where ``/proc/stat`` is missing."""

    cores: Optional[float] = None

    @staticmethod
    def _busy_s() -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        idle = fields[3] + fields[4]  # idle, iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "OtherCpu":
        self._start = (self._busy_s(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = self._busy_s(), time.process_time(), time.perf_counter()
        if busy is not None and self._start[0] is not None:
            other = (busy - self._start[0]) - (own - self._start[1])
            self.cores = max(other, 0.0) / max(wall - self._start[2], 1e-9)

    def __str__(self) -> str:
        return "unknown" if self.cores is None else f"{self.cores:.2f} cores"


def header(title: str, device: torch.device, dtypes: str, extra: Sequence[str] = ()) -> list[str]:
    import dycon_kernels
    from dycon_kernels import backends
    from dycon_kernels.backends import cpu_isa
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [f"# {title}",
             f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
             f"dycon_kernels {dycon_kernels.__version__}, commit {source_commit()}",
             f"device: {device.type}; {os.cpu_count()} logical cores visible, torch threads: "
             f"{torch.get_num_threads()}; load average {_load_average()}",
             cpu_isa.summary()]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {p.name}, {p.total_memory / GiB:.1f} GiB, {p.multi_processor_count} SMs, "
                     f"sm_{p.major}{p.minor}")
    lines += [f"python {platform.python_version()}, torch {torch.__version__} "
              f"(CUDA {torch.version.cuda}), triton {triton_version}, "
              f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}",
              # the trainer logs the same lines at its start (dycon.loop.log_kernels)
              *backends.report_lines(backends.report(device)),
              f"dtypes: {dtypes}",
              "time: median over repeats after warm-up, ms ("
              + ("CUDA events after synchronize" if device.type == "cuda" else "perf_counter") + "); "
              "bwd = backward(retain_graph=True) alone; fwd+bwd = both in one call",
              ("memory: torch.cuda.max_memory_allocated() minus memory_allocated() after the inputs "
               "exist, one fwd+bwd after a warm-up call (gradients included)" if device.type == "cuda"
               else "memory: " + cpu_memory_method() + " (gradients included)")]
    return lines + list(extra)


# --------------------------------------------------------------------------- output

class Report:
    """Lines printed to stdout and kept for the ``.md`` copy written next to the CSV."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = ""):
        print(line, flush=True)
        self.lines.append(line)

    def save(self, path: str):
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")

    def save_all(self, stem: str, rows: Sequence[dict], **plot):
        """``stem``.csv (the rows) and ``stem``.md (this report), then the optional ``stem``.png
        (``write_plot(**plot)``): the numbers are on disk before the plot can fail."""
        write_csv(stem + ".csv", rows)
        self()
        self(f"wrote {stem}.csv, {stem}.md")
        self.save(stem + ".md")
        try:
            write_plot(stem + ".png", rows, **plot)
        except ImportError as exc:
            print(f"no plot {stem}.png: {exc} (pip install matplotlib); the CSV and .md are written", flush=True)
            return
        print(f"wrote {stem}.png", flush=True)


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if math.isinf(value) or math.isnan(value):
            return str(value)
        mag = abs(value)
        return f"{value:.{digits}g}" if mag < 10 ** digits else f"{value:.0f}"
    return str(value)


def table(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
    """A Markdown table of ``rows`` (dicts) over ``columns`` (missing cells are '-')."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells]


def write_csv(path: str, rows: Sequence[dict]):
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path: str, rows: Sequence[dict], *, x: str, xlabel: str, series: Sequence[str],
               metrics: Sequence[tuple[str, str]], panels: Sequence[str] = (), title: str = ""):
    """Log-log lines of each metric against ``x``: one column of axes per value of ``panels``,
    one row per metric, one line per value of ``series``. Rows whose metric is missing are skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = lambda r, ks: " ".join(f"{k}={r[k]}" if k not in ("backend",) else str(r[k]) for k in ks)  # noqa: E731
    panel_values = list(dict.fromkeys(key(r, panels) for r in rows)) or [""]
    fig, axes = plt.subplots(len(metrics), len(panel_values), squeeze=False,
                             figsize=(4.2 * len(panel_values) + 1, 3.4 * len(metrics)))
    for col, pv in enumerate(panel_values):
        sub = [r for r in rows if key(r, panels) == pv]
        for row_i, (metric, label) in enumerate(metrics):
            ax = axes[row_i][col]
            for sv in dict.fromkeys(key(r, series) for r in sub):
                pts = sorted((r[x], r[metric]) for r in sub
                             if key(r, series) == sv and isinstance(r.get(metric), (int, float)) and r[metric] > 0)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=sv)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            if row_i == 0 and pv:
                ax.set_title(pv, fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--backends", default=None,
                   help="comma list (default: every available backend, and always the reference)")
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the CSV, PNG and .md (default %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (max)")
    p.add_argument("--mem-cap-gb", type=float, default=None,
                   help="CPU: address-space cap per case beyond its inputs (default: available RAM)")
    p.add_argument("--case-timeout", type=float, default=900.0, help="CPU: seconds per case before 'timeout'")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default: torch's default); 1 is steadier on a busy machine")
    return p


def setup(args) -> tuple[torch.device, torch.dtype, Timing, Optional[float]]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no GPU is visible")
    os.makedirs(args.out, exist_ok=True)
    timing = Timing()
    if device.type == "cpu":
        timing = Timing(warmup=1, repeats=5, budget_s=2.0)
    if args.quick:
        timing = Timing(warmup=1, repeats=3, budget_s=0.5)
    if args.repeats:
        timing.repeats = args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)  # the header reports it; CPU cases set it themselves
        timing.threads = args.threads
    cap = args.mem_cap_gb * GiB if args.mem_cap_gb else None
    if device.type == "cpu" and cap is None:
        cap = available_memory(device, None) * 0.9
    return device, DTYPES[args.dtype], timing, cap


def backends_to_run(args, device: torch.device) -> list[str]:
    import dycon_kernels
    names = dycon_kernels.available_backends(device)
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        names = [b for b in wanted if b in names or b == "reference"]
    if "reference" not in names:
        names.append("reference")
    return names


def run_sweep(specs: Sequence[dict], make_case, device: torch.device, timing: Timing, out: "Report", *,
              warm_spec: Callable[[dict], Optional[dict]], skip: Callable[[dict], Optional[str]] = lambda s: None,
              mem_cap: Optional[float] = None, case_timeout: float = 900.0) -> list[dict]:
    """Measure every spec (a dict naming ``backend`` and the size); one row per spec, progress
    on stdout. ``skip(spec)`` may return a status (e.g. 'skipped (est. 9 GB)') instead of running.
    Ctrl-C (or ``timeout -s INT``) ends the sweep early and keeps the rows measured so far."""
    rows = []
    try:
        for spec in specs:
            reason = skip(spec)
            if reason:
                res = Result(reason)
            else:
                res = measure(make_case, spec, device, timing, warm_spec=warm_spec(spec), mem_cap=mem_cap,
                              case_timeout=case_timeout)
            rows.append(dict(spec, status=res.status, fwd_ms=res.fwd_ms, bwd_ms=res.bwd_ms,
                             full_ms=res.full_ms, peak_mib=res.peak_mib, error=res.error))
            desc = " ".join(f"{k}={v}" for k, v in spec.items() if k != "dtype")
            print(f"  {desc}: {res.status}, fwd+bwd {fmt(res.full_ms)} ms, peak {fmt(res.peak_mib)} MiB",
                  flush=True)
    except KeyboardInterrupt:
        out("(interrupted: the table holds the cases measured so far)")
    return rows


def add_reference_ratios(rows: list[dict], size_keys: Sequence[str]):
    """``speedup`` = reference fwd+bwd time / this one; ``mem_saving`` = reference peak / this one,
    against the reference row of the same size (same values of ``size_keys``)."""
    for row in rows:
        ref = next((r for r in rows if r["backend"] == "reference"
                    and all(r[k] == row[k] for k in size_keys)), {})
        row["speedup"] = ratio(ref.get("full_ms"), row["full_ms"])
        row["mem_saving"] = ratio(ref.get("peak_mib"), row["peak_mib"])


def find_row(rows: Sequence[dict], **where) -> Optional[dict]:
    return next((r for r in rows if all(r.get(k) == v for k, v in where.items())), None)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``, or None when either is missing or ``b`` is 0."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def results(rows: Sequence[dict], columns: Sequence[str], label: Callable[[dict], str]) -> list[str]:
    """The table of ``rows``, then one note per failed case (named by ``label(row)``)."""
    notes = [f"- {label(r)}: {r['status']}: {r['error']}" for r in rows if r.get("error")]
    return table(rows, columns) + ((["", "errors:"] + notes) if notes else [])
