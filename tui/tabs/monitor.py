"""Monitor: an instance's CPU, memory and GPUs (from the agent, 1 Hz) and runs' metric curves.

Pick the instance with `i`; mark runs to overlay with space/enter in the list;
`m` cycles the metric, `L` toggles a log scale, `s` cycles smoothing (EMA, as
TensorBoard). Curves are plotted against steps (textual-plotext's date axis is
broken with plotext 5.3), from series downsampled to the chart's width with
min/max buckets, so a refresh costs the same at 1k and at 10M points.
A run whose GPUs averaged under 30% over the last 5 minutes is flagged ⚠.
"""

from __future__ import annotations

from collections import Counter

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option
from textual_plotext import PlotextPlot

from backends.models import Run

from backends.text import plain_line as pl

from ..format import STATE_STYLE
from ..steps import step_ticks
from ..widgets import matches
from . import TabView

COLORS = ["cyan", "orange", "green", "magenta", "yellow", "blue", "red", "white"]  # plotext names
RICH = {"orange": "dark_orange"}  # rich has no plain "orange"
SMOOTHING = (0.0, 0.6, 0.9)
MAX_LISTED = 200


def default_run(runs: list[Run], me: str) -> Run | None:
    """What Monitor shows first: the newest running run of yours, else the newest run (anyone's) with
    metrics, else the newest run. A cancelled run with nothing to chart is not a useful first view."""
    newest = sorted(runs, key=lambda r: r.id, reverse=True)
    for ok in (lambda r: r.user == me and r.state == "running",
               lambda r: r.user == me and r.run_state.is_active,
               lambda r: bool(r.metrics_summary)):
        pick = next((r for r in newest if ok(r)), None)
        if pick:
            return pick
    return newest[0] if newest else None


class MonitorTab(TabView):
    TAB_ID = "monitor"
    TITLE = "Monitor"
    BINDINGS = [
        Binding("i", "next_instance", "Instance", id="monitor.instance", tooltip="Show the next instance's hardware"),
        Binding("m", "next_metric", "Metric", id="monitor.metric", tooltip="Chart the next metric"),
        Binding("L", "toggle_log", "Log scale", id="monitor.log", tooltip="Logarithmic y axis for metrics"),
        Binding("s", "next_smoothing", "Smooth", id="monitor.smooth", tooltip="Cycle EMA smoothing: off, 0.6, 0.9"),
        Binding("space", "toggle_run", "Overlay", id="monitor.overlay", tooltip="Add/remove the highlighted run"),
        Binding("v", "media", "Media", id="monitor.media", tooltip="The highlighted run's images, tables, histograms"),
    ]

    def __init__(self) -> None:
        super().__init__(id="monitor-view")
        self.instance = "local"
        self.instance_names: list[str] = ["local"]
        self.runs: list[Run] = []
        self.selected: list[str] = []  # run ids overlaid, in the order chosen
        self.metric: str | None = None
        self.log_y = False
        self.smoothing = 0.0
        self.idle: dict[str, float] = {}
        self._listed: list[str] = []

    def compose(self) -> ComposeResult:
        yield Static("", id="monitor-summary")
        with Horizontal(id="monitor-main"):
            yield OptionList(id="monitor-runs")
            with Vertical(id="monitor-right"):
                with Horizontal(id="monitor-charts"):
                    yield PlotextPlot(id="cpu-chart")
                    yield PlotextPlot(id="gpu-chart")
                yield PlotextPlot(id="metric-chart")
        yield Static("", id="monitor-status", classes="status-line")

    # ---- data from the app -------------------------------------------------
    def show_runs(self, runs: list[Run], idle: dict[str, float]) -> None:
        self.runs = runs
        self.idle = idle
        if not self.selected:
            pick = default_run(runs, self.app.workstation.user)
            if pick:
                self.selected = [pick.id]
        self._fill_list()

    def show_instances(self, names: list[str]) -> None:
        self.instance_names = names or ["local"]
        if self.instance not in self.instance_names:
            self.instance = self.instance_names[0]

    def candidates(self) -> list[Run]:
        """The runs listed, newest first: an order that a state change, new metrics or marking a run
        never changes (a new run appears on top; the cursor stays on its run). The overlaid runs are
        always listed, even past MAX_LISTED."""
        shown = [r for r in self.runs
                 if not self.filter_text or matches(self.filter_text, (r.display_name, r.user, r.state, r.instance))]
        keep = {r.id for r in shown[:MAX_LISTED]} | set(self.selected)
        return sorted((r for r in shown if r.id in keep), key=lambda r: r.id, reverse=True)

    def _fill_list(self) -> None:
        if not self.is_mounted:
            return
        ol = self.query_one(OptionList)
        runs = self.candidates()
        ids = [r.id for r in runs]
        prompts = [self._prompt(r) for r in runs]
        if ids == self._listed:
            for i, p in enumerate(prompts):
                ol.replace_option_prompt_at_index(i, p)
            return
        highlighted = ol.highlighted
        keep = self._listed[highlighted] if highlighted is not None and highlighted < len(self._listed) else None
        ol.clear_options()
        ol.add_options([Option(p, id=i) for p, i in zip(prompts, ids)])
        self._listed = ids
        if keep in ids:
            ol.highlighted = ids.index(keep)
        elif ids:
            ol.highlighted = 0

    def _prompt(self, r: Run) -> Text:
        t = Text()
        if r.id in self.selected:
            color = COLORS[self.selected.index(r.id) % len(COLORS)]
            t.append("● ", style=RICH.get(color, color))
        else:
            t.append("○ ", style="dim")
        t.append(pl(r.display_name)[:22], style="bold")
        t.append(f" {pl(r.state)}", style=STATE_STYLE.get(r.state, ""))
        t.append(f" · {pl(r.instance)}", style="dim")
        if r.id in self.idle:
            t.append(f" ⚠ GPU {self.idle[r.id]:.0f}%", style="bold yellow")
        return t

    # ---- actions -----------------------------------------------------------
    def action_media(self) -> None:
        ol = self.query_one(OptionList)
        if ol.highlighted is None or ol.highlighted >= len(self._listed):
            self.app.notify("No run highlighted.", severity="warning")
            return
        run = next((r for r in self.app.runs if r.id == self._listed[ol.highlighted]), None)
        if run is not None:
            from ..mediaview import open_media

            open_media(self.app, run)

    def action_toggle_run(self) -> None:
        ol = self.query_one(OptionList)
        if ol.highlighted is None or ol.highlighted >= len(self._listed):
            return
        run_id = self._listed[ol.highlighted]
        if run_id in self.selected:
            self.selected.remove(run_id)
        else:
            self.selected.append(run_id)
        self._fill_list()
        self.app.poll_monitor()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.action_toggle_run()

    def action_next_instance(self) -> None:
        names = self.instance_names
        self.instance = names[(names.index(self.instance) + 1) % len(names)] if self.instance in names else names[0]
        self.app.poll_monitor()
        self.rerender()

    def action_next_metric(self) -> None:
        names = self.metric_names()
        if names:
            self.metric = names[(names.index(self.metric) + 1) % len(names)] if self.metric in names else names[0]
        self.rerender()

    def action_toggle_log(self) -> None:
        self.log_y = not self.log_y
        self.rerender()

    def action_next_smoothing(self) -> None:
        self.smoothing = SMOOTHING[(SMOOTHING.index(self.smoothing) + 1) % len(SMOOTHING)]
        self.rerender()

    def metric_names(self) -> list[str]:
        mon = self.app.workstation.monitor
        names: set[str] = set()
        for run_id in self.selected:
            rm = mon.runs.get(run_id)
            if rm:
                names.update(rm.series.names())
        return sorted(names, key=lambda n: (0 if "loss" in n else 1, n))

    # ---- drawing -----------------------------------------------------------
    def rerender(self) -> None:
        if not self.is_mounted:
            return
        self._fill_list()
        mon = self.app.workstation.monitor
        inst = mon.instances.get(self.instance)
        last = inst.last if inst else {}
        summary = Text()
        summary.append(pl(self.instance), style="bold")
        if last:
            summary.append(f" · CPU {last.get('cpu', 0):.0f}% of {last.get('ncpu', '?')} · memory "
                           f"{last.get('mem_used', 0) / 1024:.1f}/{last.get('mem_total', 0) / 1024:.1f} GiB · load {pl(last.get('load1', 0))}")
            gpus = last.get("gpus") or []
            for g in gpus:
                summary.append(f" · GPU{pl(g['index'])} {g.get('util', 0):.0f}% {g.get('mem_used', 0):.0f}/{g.get('mem_total', 0):.0f} MiB"
                               f" {g.get('temp', 0):.0f}°C {g.get('power', 0):.0f} W")
            if not gpus:
                summary.append(" · no NVIDIA GPU: host metrics only", style="dim")
        else:
            summary.append(" · waiting for the agent's first sample…", style="dim")
        self.query_one("#monitor-summary", Static).update(summary)

        cpu_chart = self.query_one("#cpu-chart", PlotextPlot)
        width = max(20, cpu_chart.size.width - 10)
        if inst:
            self._draw(cpu_chart, f"{pl(self.instance)}: CPU / memory %",
                       [("cpu", inst.cpu, "cyan"), ("mem", inst.mem, "orange")], width, ylim=(0, 100))
            gpu_lines = [(f"gpu{i}", s, COLORS[k % len(COLORS)]) for k, (i, s) in enumerate(sorted(inst.gpu_util.items()))]
            # no GPUs: the CPU chart takes the whole row (at 80 columns two charts are too narrow to read)
            self.query_one("#gpu-chart", PlotextPlot).display = bool(gpu_lines)
            self._draw(self.query_one("#gpu-chart", PlotextPlot), f"{pl(self.instance)}: GPU utilization %" if gpu_lines
                       else f"{pl(self.instance)}: no GPUs", gpu_lines, width, ylim=(0, 100))
        metric_lines = []
        names = self.metric_names()
        if names and self.metric not in names:
            self.metric = names[0]
        if self.metric:
            for k, run_id in enumerate(self.selected):
                rm = mon.runs.get(run_id)
                s = rm.series.get(self.metric) if rm else None
                if s is not None and len(s):
                    name = pl(rm.run.display_name)
                    metric_lines.append((name, s, COLORS[k % len(COLORS)]))
        mchart = self.query_one("#metric-chart", PlotextPlot)
        title = (f"{pl(self.metric)} by step" if self.metric else "no metrics yet: log them with labdeck.log() or print key=value")
        title += (" · log" if self.log_y else "") + (f" · smoothing {self.smoothing:g}" if self.smoothing else "")
        self._draw(mchart, title, metric_lines, max(20, mchart.size.width - 12), log_y=self.log_y, smoothing=self.smoothing)
        status = Text(f"{len(self.selected)} run(s) overlaid · metrics: {', '.join(pl(n) for n in names[:8]) or '–'}"
                      + (" …" if len(names) > 8 else ""))
        warn = sum((mon.runs[r].warnings for r in self.selected if r in mon.runs), start=Counter())
        if warn:
            status.append(" · skipped: " + ", ".join(f"{n} {pl(k)}" for k, n in warn.most_common(3)), style="yellow")
        self.query_one("#monitor-status", Static).update(status)

    def _draw(self, widget: PlotextPlot, title: str, lines, width: int, *, ylim=None, log_y=False, smoothing=0.0) -> None:
        plt = widget.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        drawn = False
        x_range: list[float] = []
        for label, series, color in lines:
            xs, lo, hi = series.view(width, log_y=log_y, smoothing=smoothing)
            if not xs:
                continue
            x_range += (min(xs), max(xs))
            plt.plot(xs, hi, label=label if len(lines) > 1 else None, color=color, marker="braille")
            if lo != hi:
                plt.plot(xs, lo, color=color, marker="braille")
            drawn = True
        if ylim and drawn:
            plt.ylim(*ylim)
        if log_y and drawn:
            plt.yscale("log")
        plt.xlabel("step" if widget.id == "metric-chart" else "sample (1/s)")
        if widget.id == "metric-chart" and x_range:  # integer step labels, never "1000.0" or "9.2e+18"
            plt.xticks(*step_ticks(min(x_range), max(x_range)))
        widget.refresh()

    def shown(self) -> None:
        self.rerender()

    def apply_filter(self, text: str) -> None:
        self.filter_text = text
        self._fill_list()

