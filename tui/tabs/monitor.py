"""Monitor: this machine's live CPU and memory (and GPUs when a driver exists), sampled at 1 Hz.

Per-run metric curves and remote instances' agents plug in here later; the
charts are plotted against numeric sample indexes (textual-plotext's date axis
is broken with plotext 5.3).
"""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static
from textual_plotext import PlotextPlot

from . import TabView

HISTORY = 300  # samples kept per series (5 minutes at 1 Hz)


class MonitorTab(TabView):
    TAB_ID = "monitor"
    TITLE = "Monitor"

    def __init__(self) -> None:
        super().__init__(id="monitor-view")
        self.n = 0
        self.cpu: deque[float] = deque(maxlen=HISTORY)
        self.mem: deque[float] = deque(maxlen=HISTORY)
        self.gpu: dict[int, deque[float]] = {}
        self.last: dict = {}

    def compose(self) -> ComposeResult:
        yield Static("local · waiting for the first sample…", id="monitor-summary")
        with Horizontal(id="monitor-charts"):
            yield PlotextPlot(id="cpu-chart")
            yield PlotextPlot(id="mem-chart")
        yield PlotextPlot(id="gpu-chart")

    def on_mount(self) -> None:
        self.query_one("#gpu-chart").display = False

    def add_sample(self, s: dict) -> None:
        self.n += 1
        self.last = s
        self.cpu.append(float(s["cpu_percent"]))
        self.mem.append(100.0 * s["mem_used_mib"] / max(1, s["mem_total_mib"]))
        for g in s.get("gpus", []):
            self.gpu.setdefault(g["index"], deque(maxlen=HISTORY)).append(float(g["util"] or 0))
        self.rerender()

    def _draw(self, chart_id: str, title: str, series: dict[str, deque[float]]) -> None:
        widget = self.query_one(chart_id, PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        plt.ylim(0, 100)
        for label, values in series.items():
            if values:
                xs = list(range(self.n - len(values) + 1, self.n + 1))
                plt.plot(xs, list(values), label=label if len(series) > 1 else None, marker="braille")
        plt.xlabel("sample (1/s)")
        widget.refresh()

    def rerender(self) -> None:
        if not self.is_mounted or not self.last:
            return
        s = self.last
        summary = Text()
        summary.append("local", style="bold")
        summary.append(f" · CPU {s['cpu_percent']:.0f}% · memory {s['mem_used_mib'] / 1024:.1f} / "
                       f"{s['mem_total_mib'] / 1024:.1f} GiB · load {s['load1']:.2f}")
        if s.get("gpus"):
            for g in s["gpus"]:
                summary.append(f" · GPU{g['index']} {g['util']}% {g['mem_used_mib']}/{g['mem_total_mib']} MiB {g['temp_c']}°C")
        else:
            summary.append(" · no NVIDIA GPU: host metrics only", style="dim")
        self.query_one("#monitor-summary", Static).update(summary)
        self._draw("#cpu-chart", "CPU %", {"cpu": self.cpu})
        self._draw("#mem-chart", "Memory %", {"memory": self.mem})
        gpu_chart = self.query_one("#gpu-chart")
        gpu_chart.display = bool(self.gpu)
        if self.gpu:
            self._draw("#gpu-chart", "GPU utilization %", {f"gpu{i}": v for i, v in sorted(self.gpu.items())})
