"""Where a stage's time goes: a few optimizer steps recorded under torch.profiler and summarised.

A stage with `profile_steps: N` records the N steps after its first (which compiles and sets up) and reports, per
step: the wall time; the GPU's kernel time and how busy it kept the device; the number of kernels; each phase of
the step (data, forward, backward, checks, optimizer) by host time and, on a GPU, by stream time between CUDA
events; the kernels grouped by kind (matrix products, attention, kernels compiled by inductor, linearize's and
fla's own Triton kernels, ATen's elementwise and reduction kernels, optimizer, copies); and the costliest
operators by device and by host time. The summary goes into the stage report (`details.profile` in results.json)
and, as text, into the run's output folder.

Reading it: a GPU busy most of the wall time is bound by its kernels (then the groups say which); a low share
with a long `checks` host phase is the host waiting for the device, and a low share with short `checks` is the
host launching kernels more slowly than the GPU runs them.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "checks", "optimizer")

# Kernel kinds by name, tried in order; the first match wins. Names as CUDA reports them (cuBLAS, cuDNN, FlashAttention,
# inductor's `triton_*`, ATen's `at::native`, the fused optimizers' `multi_tensor_apply`); the rest are Triton kernels
# launched by linearize and fla.
KERNEL_GROUPS = (
    ("copies", re.compile(r"memcpy|memset", re.I)),
    ("attention", re.compile(r"flash|fmha|cudnn|attention|sdpa", re.I)),
    ("matrix products", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma|s16816|splitk", re.I)),
    ("optimizer", re.compile(r"multi_tensor_apply|adam", re.I)),
    ("compiled (inductor)", re.compile(r"^triton_")),
    ("ATen elementwise and reductions", re.compile(r"at::|at_cuda|native::|cub::|thrust::")),
)
OTHER_KERNELS = "Triton (linearize, fla)"


def activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    """What torch.profiler records on `device`: the host's ops, and on CUDA the kernels."""
    kinds = torch.profiler.ProfilerActivity
    return [kinds.CPU] + ([kinds.CUDA] if device.type == "cuda" else [])


def costliest(averages, device: torch.device, rows: int = 30, name_width: int = 55) -> str:
    """The `rows` costliest of a profile's `averages` by self CPU time, and on CUDA by GPU time too, as tables."""
    keys = ("self_cpu_time_total", "self_device_time_total")[: 1 + (device.type == "cuda")]
    return "\n\n".join(averages.table(sort_by=key, row_limit=rows, max_name_column_width=name_width) for key in keys)


def kernel_group(name: str) -> str:
    return next((group for group, pattern in KERNEL_GROUPS if pattern.search(name)), OTHER_KERNELS)


class StepProfiler:
    """Profiles optimizer steps `first` to `first + steps - 1` of a stage on `device`.

    The loop calls `begin(step)` and `end(step)` around each step and runs each part of the step in `phase(name)`;
    outside the profiled steps these cost nothing. After the last profiled step `summary` holds the figures and
    `text` the report.
    """

    def __init__(self, first: int, steps: int, device: torch.device):
        self.first, self.last = first, first + steps
        self.device = device
        self.cuda = device.type == "cuda"
        self.profiler: torch.profiler.profile | None = None
        self.host: dict[str, float] = {}
        self.marks: list[tuple[str, Any, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.text = ""
        self.current = -1

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def begin(self, step: int) -> None:
        self.current = step
        if step != self.first or self.first >= self.last:
            return
        self._sync()
        self.profiler = torch.profiler.profile(activities=activities(self.device))
        self.profiler.__enter__()
        self.started = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        if not self.first <= self.current < self.last:
            yield
            return
        start = torch.cuda.Event(enable_timing=True) if self.cuda else None
        if start is not None:
            start.record()
        began = time.perf_counter()
        with torch.profiler.record_function(f"linearize.{name}"):
            yield
        self.host[name] = self.host.get(name, 0.0) + time.perf_counter() - began
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.marks.append((name, start, end))

    def end(self, step: int) -> None:
        if step != self.last - 1 or self.profiler is None:
            return
        self._sync()
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        self.summary = self._summarise(wall)
        self.text = self._report()
        self.profiler = None

    def stop(self) -> None:
        """End the recording without a summary (a stage that ended before its last profiled step)."""
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None

    def _summarise(self, wall: float) -> dict[str, Any]:
        steps = self.last - self.first
        device: dict[str, float] = {}
        for name, start, end in self.marks:
            device[name] = device.get(name, 0.0) + start.elapsed_time(end) / 1e3
        # A record_function range (the phases, the optimizer's step) also shows on the device as a span over its kernels.
        kernels = [
            e for e in self.profiler.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False) and not e.name.startswith("linearize.")
        ]
        groups: dict[str, float] = {}
        for event in kernels:
            group = kernel_group(event.name)
            groups[group] = groups.get(group, 0.0) + event.time_range.elapsed_us() / 1e3
        kernel_ms = sum(groups.values())
        phases = {
            name: {"host_ms": round(1e3 * self.host[name] / steps, 3), **({"device_ms": round(1e3 * device[name] / steps, 3)} if name in device else {})}
            for name in PHASES if name in self.host
        }
        summary = {
            "steps": steps,
            "first_step": self.first + 1,
            "wall_ms_per_step": round(1e3 * wall / steps, 3),
            "phases": phases,
        }
        if self.cuda:
            summary.update(
                kernel_ms_per_step=round(kernel_ms / steps, 3),
                device_busy=round(kernel_ms / (1e3 * wall), 4),
                kernels_per_step=round(len(kernels) / steps, 1),
                kernel_groups_ms_per_step={g: round(ms / steps, 3) for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])},
            )
        return summary

    @property
    def headline(self) -> str:
        """One line: the wall time a step, the kernels' time and share on a GPU, and the longest phase by host time."""
        s = self.summary
        line = f"profiled steps {s['first_step']}-{s['first_step'] + s['steps'] - 1}: {s['wall_ms_per_step']:.1f} ms a step"
        if self.cuda:
            line += f", kernels {s['kernel_ms_per_step']:.1f} ms ({s['device_busy']:.0%} of it), {s['kernels_per_step']:,.0f} kernels"
        longest = max(s["phases"], key=lambda name: s["phases"][name]["host_ms"])
        return line + f"; longest phase {longest} ({s['phases'][longest]['host_ms']:.1f} ms on the host)"

    def _report(self) -> str:
        s = self.summary
        lines = [self.headline]
        lines.append("phase: host ms" + (" / device ms (stream time between events)" if self.cuda else "") + " a step")
        for name, times in s["phases"].items():
            lines.append(f"  {name}: {times['host_ms']:.2f}" + (f" / {times['device_ms']:.2f}" if "device_ms" in times else ""))
        if self.cuda:
            lines.append("kernel time by kind, ms a step")
            lines += [f"  {group}: {ms:.2f}" for group, ms in s["kernel_groups_ms_per_step"].items()]
        return "\n".join(lines) + "\n\n" + costliest(self.profiler.key_averages(), self.device, name_width=110) + "\n"
