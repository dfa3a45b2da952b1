"""Lineage: the team's runs as a tree — baselines at the roots, derived runs below — loaded lazily.

Each node shows name, user, state and the project's key metric with its change
from the parent. The detail pane has the params and code diff against the
parent, the metrics summary, the key metric's curve overlaid with the parent's,
cost, notes and tags. `/` filters with the query language (`user:alice lr>1e-3
tag:best metric.val_loss<0.3`, OR, NOT, parentheses, ancestors:RUN); enter or
space opens a node; `m` marks runs and `c` compares two; `a` adds a note, `t` a tag (to anyone's run: they go
in your own store); `l` opens the log, `j` shows it in Jobs, `M` in Monitor.

A run that logged media gets a media strip under its detail: one key at the run's latest step beside
the parent's nearest step (images, histograms, confusion matrices with the difference, tables with
differing cells, text), drawn with :mod:`tui.mediaview`'s renderers. `n` shows the next key, `v` opens
the full Media view. The strip is read lazily in a worker, only for the run the cursor rests on; a
result for a run the cursor has left is dropped; an active run's strip is read again every few
seconds while the tab is shown. In a small terminal it is one line naming the keys.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from typing import Any

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Static, Tree
from textual_plotext import PlotextPlot

from backends import clock
from backends import lineage as lin
from backends.metrics import lower_is_better
from backends.models import Run
from backends.text import plain, plain_line as pl

from ..format import STATE_STYLE, duration, safe, short_id, text
from . import TabView

MAX_ROOTS = 500
DIFF_LINES = 60
#: How long the cursor rests on a run before its media are read (moving on cancels the read).
MEDIA_SETTLE = 0.2
#: Lines of one side of the media strip (an image is drawn in at most this many rows of half blocks).
MEDIA_ROWS = 8
#: How often the strip of an active run is read again while the tab is shown (seconds).
MEDIA_LIVE_EVERY = 5.0
#: Below this width of the detail pane, or this height of the terminal, the strip is one line.
MEDIA_MIN_WIDTH, MEDIA_MIN_HEIGHT = 42, 30
#: Rows and columns of a logged table shown in the strip.
MEDIA_TABLE_ROWS, MEDIA_TABLE_COLS = 6, 6
#: Index entries the kept media sources hold in all, past the two newest (a run's index may hold
#: 200,000 entries, ~90 MB and more with captions: 32 such sources were gigabytes).
MEDIA_KEEP_ENTRIES = 200_000
#: Bytes the kept decoded items hold in all, past the two newest (an image of MAX_PIXELS is 48 MB of
#: RGB, a 16 MiB table several times that: 32 of them were gigabytes).
MEDIA_KEEP_BYTES = 256 << 20


def _fmt(v) -> str:
    """A param or metric value as one line of plain text (it was written by whoever ran the run)."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return pl(v)


class LineageTab(TabView):
    TAB_ID = "lineage"
    TITLE = "Lineage"
    BINDINGS = [
        Binding("m", "mark", "Mark", id="lineage.mark", tooltip="Mark for comparing (two at most)"),
        Binding("c", "compare", "Compare", id="lineage.compare", tooltip="Compare the two marked runs"),
        Binding("a", "note", "Note", id="lineage.note", tooltip="Add a note to this run"),
        Binding("t", "tag", "Tag", id="lineage.tag", tooltip="Tag this run (e.g. best)"),
        Binding("l", "logs", "Logs", id="lineage.logs", tooltip="Open this run's log"),
        Binding("j", "jobs", "In Jobs", id="lineage.jobs", tooltip="Show this run in Jobs"),
        Binding("M", "monitor", "In Monitor", id="lineage.monitor", tooltip="Chart this run in Monitor"),
        Binding("S", "serve", "Serve", id="lineage.serve", tooltip="Serve this run's model (litserve)"),
        Binding("R", "rerun_changes", "Rerun…", id="lineage.rerun_changes",
                tooltip="Edit this run's parameters, command, instance or environment, then run it as its child"),
        Binding("v", "media", "Media", id="lineage.media", tooltip="This run's media beside its parent's"),
        Binding("n", "media_key", "Media key", id="lineage.media_key",
                tooltip="Show the next media key in the detail pane's media strip"),
    ]

    DEFAULT_CSS = """
    #lineage-media { height: auto; padding: 0 1; margin-top: 1; }
    #lineage-media-head { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    #lineage-media-row { height: auto; }
    .lineage-media-side { width: 1fr; height: auto; max-height: 24; overflow: hidden; padding-right: 1; }
    """

    FILTER_HINT = "query: lr>1e-3 and state:succeeded · user:bob · tag:best · metric.loss<0.3 · OR, NOT, ( )"
    HELP_NOTES = (("space, ⏎", "Expand or collapse a run's derived runs"),)
    HELP_TEXT = ("/ filters with the query language: lr>1e-3 and state:succeeded · user:bob · tag:best · "
                 "metric.loss<0.3 · cost<5 · duration>30m · created>2026-11-01 · ancestors:RUN · name:wide* · "
                 "a bare word matches names, commands and users; OR, NOT and ( ) combine terms.")

    def __init__(self) -> None:
        super().__init__(id="lineage-view")
        self.view: lin.TeamLineage | None = None
        self.runs: dict[str, Run] = {}
        self.derived: dict[str | None, list[Run]] = {}
        self.key: str | None = None
        self.marked: list[str] = []
        self.current: str | None = None
        self.filter_error = ""
        self._signature: tuple = ()
        self._total = 0  # roots the tree would show (before MAX_ROOTS)
        self._diffs: dict[tuple[str | None, str], str] = {}  # (parent id, run id) -> code diff
        self._dirty = False
        self.served: set[str] = set()  # runs with a live deployment
        # the media strip: sources by run id (their index mirrors are kept), decoded items by
        # (run id, key, step, file), and what the strip shows now
        self._media_sources: OrderedDict[str, Any] = OrderedDict()
        self._media_docs: OrderedDict[tuple, Any] = OrderedDict()
        self._media_pair: tuple[str, str | None] | None = None  # (run id, parent id) the strip is for
        self._media_key: str | None = None  # the key last chosen with n (kept across runs that have it)
        self._media_shown: dict | None = None  # what the last finished read found for _media_pair

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="lineage-left"):
                tree: Tree[str] = Tree("runs", id="lineage-tree")
                tree.show_root = False
                yield tree
                yield Static("", id="lineage-status", classes="status-line")
            with VerticalScroll(id="lineage-right"):
                yield Static("Select a run to see where it came from.", id="lineage-detail")
                with Vertical(id="lineage-media"):
                    yield Static("", id="lineage-media-head")
                    with Horizontal(id="lineage-media-row"):
                        yield Static("", id="lineage-media-a", classes="lineage-media-side")
                        yield Static("", id="lineage-media-b", classes="lineage-media-side")
                yield PlotextPlot(id="lineage-chart")

    def on_mount(self) -> None:
        self.query_one("#lineage-chart").display = False
        self.query_one("#lineage-media").display = False
        self.set_interval(MEDIA_LIVE_EVERY, self._media_live)

    # ---- data -------------------------------------------------------------
    def show_lineage(self, view: lin.TeamLineage) -> None:
        runs = list(view.runs.values())
        key = lin.key_metric(runs)
        # the tree's shape, and what its labels show: a name, state, key metric or tag that changed redraws them
        structure = tuple((r.id, r.parent) for r in runs)
        labels = (key, tuple((r.state, r.name, lin.metric_value(r, key)) for r in runs),
                  tuple((a.id, a.removed) for anns in view.annotations.values() for a in anns))
        self.view = view
        self.runs = view.runs  # always the newest records: the detail pane reads them
        self.key = key
        if (structure, labels) == self._signature:
            return
        same_shape = bool(self._signature) and structure == self._signature[0]
        self._signature = (structure, labels)
        self.derived = {}  # the records in it are the new ones too (children are labelled when first opened)
        for r in sorted(runs, key=lambda r: r.id):
            parent = r.parent if r.parent in self.runs else None
            self.derived.setdefault(parent, []).append(r)
        if not self.is_active_tab:
            self._dirty = True
        elif same_shape and not self._dirty and not self.filter_text:  # (a filter may match other runs now)
            self._refresh_labels()  # keeps what is open and where the cursor is
        else:
            self.rerender()

    def show_served(self, run_ids: set[str]) -> None:
        if run_ids != self.served:
            self.served = run_ids
            if self.is_active_tab:
                self._refresh_labels()
            else:
                self._dirty = True

    def shown(self) -> None:
        if self._dirty:
            self._dirty = False
            self.rerender()

    def label(self, r: Run) -> Text:
        t = Text()
        t.append("◆ " if r.id in self.marked else "", style="bold magenta")
        t.append(pl(r.display_name), style="bold")
        t.append(f" {short_id(r.id)} · {pl(r.user)} · " if r.name else f" · {pl(r.user)} · ")
        t.append(pl(r.state), style=STATE_STYLE.get(r.state, ""))
        v = lin.metric_value(r, self.key)
        if v is not None:
            t.append(f" · {pl(self.key)} {_fmt(v)}")
            parent = self.runs.get(r.parent) if r.parent else None
            pv = lin.metric_value(parent, self.key) if parent else None
            if pv is not None:
                d = v - pv
                better = (d < 0) if lower_is_better(self.key or "") else (d > 0)
                t.append(f" ({d:+.3g})", style="green" if better else ("red" if d else "dim"))
        if r.id in self.served:
            t.append(" ⚡ served", style="bold yellow")
        tags = self.view.tags(r.id) if self.view else []
        if tags:
            t.append(" " + " ".join(f"#{pl(x)}" for x in tags), style="cyan")
        n = len(self.derived.get(r.id, []))
        if n:
            t.append(f" · {n} derived", style="dim")
        return t

    def rerender(self) -> None:
        if not self.is_mounted:
            return
        tree = self.query_one(Tree)
        tree.clear()
        if self.filter_text:
            roots = self.filtered()
        else:
            roots = self.derived.get(None, [])
        total = len(roots)
        if total > MAX_ROOTS:  # the newest baselines; the filter reaches every run
            roots = roots[-MAX_ROOTS:]
        for r in roots:
            tree.root.add(self.label(r), data=r.id, allow_expand=bool(self.derived.get(r.id)))
        if roots:
            tree.cursor_line = 0
        self._total = total
        self.rerender_status()
        if not self.runs:
            self.query_one("#lineage-detail", Static).update(
                "No runs yet. Every run lands here, under the run it was derived from "
                "(labdeck run --parent RUN …, reruns, and runs that load another run's artifact with labdeck.use()).")

    def filtered(self) -> list[Run]:
        from backends.query import FilterError, QueryContext, parse

        try:
            q = parse(self.filter_text)
            ctx = QueryContext(runs=self.runs, annotations=self.view.annotations if self.view else {},
                               edges=self.view.edges if self.view else [])
            pred = q.predicate(ctx)
            out = [r for r in self.runs.values() if pred(r)]
            self.filter_error = ""
        except FilterError as e:
            self.filter_error = e.render(self.filter_text)
            return []
        return sorted(out, key=lambda r: r.id)

    def apply_filter(self, text: str) -> None:
        self.filter_text = text
        self.filter_error = ""
        self.rerender()

    def on_tree_node_expanded(self, event: Tree.NodeExpanded) -> None:
        node = event.node
        if node.data and not node.children:  # lazy: children are added when first opened
            for child in self.derived.get(node.data, []):
                node.add(self.label(child), data=child.id, allow_expand=bool(self.derived.get(child.id)))

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        run = self.runs.get(event.node.data) if event.node.data else None
        if run is not None:
            self.current = run.id
            self.show_detail(run)

    def selected_run(self) -> Run | None:
        return self.runs.get(self.current) if self.current else None

    # ---- the detail pane --------------------------------------------------
    def show_detail(self, r: Run) -> None:
        parent = self.runs.get(r.parent) if r.parent else None
        now = clock.now()
        t = Text()
        t.append(pl(r.display_name), style="bold")
        t.append(f"  {short_id(r.id)} · {pl(r.user)} · ")
        t.append(pl(r.state), style=STATE_STYLE.get(r.state, ""))
        t.append(f"\n{pl(r.instance)}" + (f" ({pl(r.instance_info.get('gpus') or 'no GPU')})" if r.instance_info else "")
                 + f" · {duration(r.duration_seconds(now))} · ${r.cost(now):.2f}\n", style="dim")
        t.append(f"$ {plain(r.command)}\n")
        t.append("parent: ", style="dim")
        t.append(f"{pl(parent.display_name)} {short_id(parent.id)}\n" if parent else "– (a baseline)\n")
        if r.code.get("commit"):
            t.append(f"code: {pl(r.code['commit'])[:10]}" + (" + uncommitted changes" if r.code.get("dirty") else "") + "\n", style="dim")
        changes = lin.params_diff(parent.params if parent else {}, r.params)
        if changes:
            t.append("\nparams" + (" vs parent" if parent else "") + "\n", style="bold")
            for k, old, new in changes[:40]:
                if parent is None:
                    t.append(f"  {pl(k)} = {_fmt(new)}\n")
                elif old is None:
                    t.append(f"  + {pl(k)} = {_fmt(new)}\n", style="green")
                elif new is None:
                    t.append(f"  - {pl(k)} (was {_fmt(old)})\n", style="red")
                else:
                    t.append(f"  {pl(k)}: {_fmt(old)} → {_fmt(new)}\n", style="yellow")
        elif parent:
            t.append("\nparams: same as the parent\n", style="dim")
        if r.metrics_summary:
            t.append("\nmetrics (last / best)\n", style="bold")
            names = sorted(r.metrics_summary, key=lambda n: (n != self.key, n))
            for n in names[:20]:
                m = r.metrics_summary[n]
                pv = lin.metric_value(parent, n) if parent else None
                delta = f"  (parent {_fmt(pv)})" if pv is not None else ""
                t.append(f"  {pl(n)}: {_fmt(m.get('last'))} / {_fmt(m.get('best'))}{delta}\n")
        if r.hardware.get("gpu_util_mean") is not None:
            t.append(f"\nGPU utilization (mean): {_fmt(r.hardware['gpu_util_mean'])}%\n")
        if self.view:
            tags = self.view.tags(r.id)
            if tags:
                t.append("\ntags: " + " ".join(f"#{pl(x)}" for x in tags) + "\n", style="cyan")
            for n in self.view.notes(r.id):
                t.append(f"\n{pl(n.created_at)[:16]} {pl(n.user)}: ", style="dim")
                t.append(plain(n.text))
            pair = (parent.id if parent else None, r.id)  # a run's code never changes: each pair is diffed once
            if pair not in self._diffs:  # (a `git diff` and blob reads: not again on every cursor move)
                self._diffs[pair] = lin.code_diff(parent, r, self.app.workstation.store.read_blob)
            diff = self._diffs[pair]
            if diff:
                lines = diff.splitlines()
                t.append("\n\ncode vs parent\n" if parent else "\n\ncode (uncommitted changes)\n", style="bold")
                for line in lines[:DIFF_LINES]:
                    style = "green" if line.startswith("+") else "red" if line.startswith("-") else "dim" if line.startswith("#") else ""
                    t.append(pl(line[:200]) + "\n", style=style)
                if len(lines) > DIFF_LINES:
                    t.append(f"… {len(lines) - DIFF_LINES} more lines: labdeck diff {short_id(parent.id) if parent else ''} {short_id(r.id)}\n",
                             style="dim")
        self.query_one("#lineage-detail", Static).update(t)
        self.draw_curves([r] + ([parent] if parent else []))
        self.show_media(r, parent)

    def draw_curves(self, runs: list[Run]) -> None:
        chart = self.query_one("#lineage-chart", PlotextPlot)
        mon = self.app.workstation.monitor
        lines = []
        for run, color in zip(runs, ("cyan", "orange", "green")):
            rm = mon.run(run)
            rm.update()
            s = rm.series.get(self.key) if self.key else None
            if s is not None and len(s):
                lines.append((pl(run.display_name), s, color))
        chart.display = bool(lines)
        if not lines:
            return
        plt = chart.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(f"{pl(self.key)} by step")
        width = max(20, chart.size.width - 10)
        for label, s, color in lines:
            xs, lo, hi = s.view(width)
            ys = [(a + b) / 2 for a, b in zip(lo, hi)]
            ok = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y)]
            if ok:
                plt.plot([x for x, _ in ok], [y for _, y in ok], label=label, color=color, marker="braille")
        chart.refresh()

    # ---- actions ----------------------------------------------------------
    def action_mark(self) -> None:
        r = self.selected_run()
        if r is None:
            return
        if r.id in self.marked:
            self.marked.remove(r.id)
        else:
            self.marked = (self.marked + [r.id])[-2:]
        self._refresh_labels()

    def _refresh_labels(self) -> None:
        tree = self.query_one(Tree)

        def walk(node):
            for child in node.children:
                run = self.runs.get(child.data)
                if run:
                    child.set_label(self.label(run))
                walk(child)

        walk(tree.root)
        self.rerender_status()

    def rerender_status(self) -> None:
        """The line under the tree: the filter's error or match count, what is cut, unreadable stores, marks."""
        status = self.query_one("#lineage-status", Static)
        total = self._total
        msg = Text()
        if self.filter_error:
            msg.append(self.filter_error, style="bold red")
        elif self.filter_text:
            msg.append(f"{total:,} runs match /{self.filter_text}")
        if total > MAX_ROOTS:
            msg.append(f"  showing the newest {MAX_ROOTS:,} of {total:,}: / to narrow")
        if self.view and self.view.errors:
            for user, err in self.view.errors.items():
                msg.append(f"\n⚠ {pl(user)}'s store is unreadable: {pl((err.splitlines() or [''])[0])}", style="bold red")
        if self.marked:
            msg.append(f"\n{len(self.marked)} marked" + (": c compares them" if len(self.marked) == 2 else ": mark one more"))
        status.update(Text("\n").join(line for line in msg.split("\n") if line.plain) if msg.plain else msg)
        status.display = bool(msg.plain)

    def action_compare(self) -> None:
        if len(self.marked) != 2:
            have = f" ({len(self.marked)} marked)" if self.marked else ""
            self.app.notify(f"Mark two runs with {self.app.key_of('lineage.mark')} first{have}, then press "
                            f"{self.app.key_of('lineage.compare')}.", severity="warning")
            return
        a, b = (self.runs[i] for i in self.marked)
        from ..widgets import CompareScreen

        self.app.push_screen(CompareScreen(a, b, self.view, self.key))

    def action_note(self) -> None:
        r = self.selected_run()
        if r:
            self.app.ask_annotation(r, "note")

    def action_tag(self) -> None:
        r = self.selected_run()
        if r:
            self.app.ask_annotation(r, "tag")

    def action_media(self) -> None:
        r = self.selected_run()
        if r:
            from ..mediaview import open_media

            parent = self.runs.get(r.parent) if r.parent else None
            # the strip's sources, their indexes already parsed (a teammate's may take seconds to read again)
            src = self._source(r)
            psrc = self._source(parent) if parent is not None else None
            kept = None if src is None or (parent is not None and psrc is None) else (src, psrc) if psrc else (src,)
            open_media(self.app, r, parent, sources=kept)

    def action_media_key(self) -> None:
        got = self._media_shown
        if got is None and self._media_pair is not None:  # the read of this run's media is still under way
            self.app.notify("Still reading this run's media; press n again in a moment.", timeout=3)
            return
        if not got or not got["keys"]:
            self.app.notify("This run has logged no media to show here.", severity="warning")
            return
        keys = got["keys"]
        i = keys.index(got["key"]) if got["key"] in keys else -1
        self._media_key = keys[(i + 1) % len(keys)]
        r = self.runs.get(got["run"])
        if r is not None:
            self._load_media(r, self.runs.get(r.parent) if r.parent else None, fresh=False)

    def action_logs(self) -> None:
        r = self.selected_run()
        if r:
            self.app.open_log(r)

    def action_jobs(self) -> None:
        r = self.selected_run()
        if r:
            self.app.show_in_jobs(r)

    def action_monitor(self) -> None:
        r = self.selected_run()
        if r:
            self.app.show_in_monitor(r)

    def action_serve(self) -> None:
        r = self.selected_run()
        if r:
            self.app.serve_run(r)

    def action_rerun_changes(self) -> None:
        r = self.selected_run()
        if r:
            self.app.rerun_with_changes(r)

    def focus_main(self) -> None:
        self.query_one(Tree).focus()

    # ---- the media strip ----------------------------------------------------
    def show_media(self, r: Run, parent: Run | None) -> None:
        """The strip for ``r`` beside ``parent``: drawn again at once when it is already read, else
        hidden until a worker has read it (only the run the cursor rests on is read)."""
        pair = (r.id, parent.id if parent else None)
        if pair == self._media_pair and self._media_shown is not None:
            self.paint_media()
            return
        self._media_pair, self._media_shown = pair, None
        self.query_one("#lineage-media").display = False
        self._load_media(r, parent)

    def _media_live(self) -> None:
        """An active run's strip is read again (its newest step), while this tab is the one shown."""
        if (not self.is_active_tab or self.app.screen is not self.screen or self._media_pair is None
                or self._media_shown is None):
            return
        r = self.runs.get(self._media_pair[0])
        if r is not None and r.run_state.is_active:
            self._load_media(r, self.runs.get(r.parent) if r.parent else None)

    def _source(self, run: Run):
        """The run's :class:`tui.mediaview.MediaSource` (kept: its index mirror grows, not read
        again); None for a record labdeck builds no cache path from (a malformed user or id)."""
        from backends.errors import LabdeckError

        from ..mediaview import MediaSource

        src = self._media_sources.get(run.id)
        if src is None:
            try:
                src = MediaSource(run, self.app.workstation)
            except LabdeckError:
                return None
            self._media_sources[run.id] = src
            while len(self._media_sources) > 32 or (
                    len(self._media_sources) > 2
                    and sum(len(s.media.index) for s in self._media_sources.values()) > MEDIA_KEEP_ENTRIES):
                self._media_sources.popitem(last=False)
        else:
            self._media_sources.move_to_end(run.id)
            src.run = run
        return src

    @work(group="lineage-media", exclusive=True, exit_on_error=False)
    async def _load_media(self, r: Run, parent: Run | None, fresh: bool = True) -> None:
        from backends.media import nearest_step

        pair = (r.id, parent.id if parent else None)
        if fresh:
            await asyncio.sleep(MEDIA_SETTLE)  # a cursor moving through the tree cancels this read
        src = self._source(r)
        psrc = self._source(parent) if parent is not None else None
        if src is None:
            return
        if fresh:
            await src.refresh()
            if psrc is not None:
                await psrc.refresh()
        if pair != self._media_pair:
            return  # the cursor moved on meanwhile
        keys = src.media.index.keys()
        found: dict = {"run": r.id, "keys": keys, "key": None, "entry": None, "doc": None,
                       "pentry": None, "pdoc": None, "note": src.note}
        if keys:
            key = self._media_key if self._media_key in keys else keys[0]
            found["key"] = key
            entry = src.media.index.latest(key)
            found["entry"], found["doc"] = entry, await self._media_doc(src, entry)
            if psrc is not None:
                near = nearest_step(psrc.media.index.steps(key), entry.step)
                pentry = psrc.media.index.get(key, near) if near is not None else None
                if pentry is not None and pentry.kind == entry.kind:
                    found["pentry"], found["pdoc"] = pentry, await self._media_doc(psrc, pentry)
        if pair != self._media_pair:
            return
        self._media_shown = found
        self.paint_media()

    async def _media_doc(self, src, entry) -> Any:
        """The entry's item decoded (an image's pixels in a thread; a LabdeckError when it cannot be read)."""
        from backends.errors import LabdeckError
        from backends.media import MediaError, decode_png, item_doc

        k = (src.run.id, entry.key, entry.step, entry.file)
        kept = self._media_docs.get(k)
        if kept is not None:
            self._media_docs.move_to_end(k)
            return kept[0]
        data: Any = b""
        try:
            data = await src.load(entry)
            if entry.kind == "image":
                if not isinstance(data, bytes) or data[:8] != b"\x89PNG\r\n\x1a\n":
                    raise MediaError("not a PNG (v lists it)")
                got = await asyncio.to_thread(decode_png, data)
            else:  # in a thread too: a teammate's 16 MiB table took ~0.8 s to validate
                got = await asyncio.to_thread(item_doc, entry.kind, data)
        except LabdeckError as e:
            got = e
        rgb = getattr(got, "rgb", None)  # (what it holds, roughly: parsed JSON is several times its bytes)
        self._media_docs[k] = (got, len(rgb) if rgb is not None else 8 * len(data) if isinstance(data, (bytes, str)) else 0)
        while len(self._media_docs) > 32 or (
                len(self._media_docs) > 2 and sum(n for _, n in self._media_docs.values()) > MEDIA_KEEP_BYTES):
            self._media_docs.popitem(last=False)
        return got

    def on_resize(self) -> None:
        if self._media_shown is not None:
            self.paint_media()

    def paint_media(self) -> None:
        """Draw what :meth:`_load_media` found, for the pane's size now."""
        box = self.query_one("#lineage-media")
        got = self._media_shown
        if not got or not got["keys"]:
            box.display = False
            return
        box.display = True
        head = self.query_one("#lineage-media-head", Static)
        row = self.query_one("#lineage-media-row")
        keys, key, entry, pentry = got["keys"], got["key"], got["entry"], got["pentry"]
        width = self.query_one("#lineage-right").size.width - 3
        nkey, vkey = self.app.key_of("lineage.media_key"), self.app.key_of("lineage.media")
        h = Text(no_wrap=True, overflow="ellipsis")
        if width < MEDIA_MIN_WIDTH or self.app.size.height < MEDIA_MIN_HEIGHT:
            h.append("media ", style="bold")
            h.append(f"({vkey} to view): ", style="dim")
            h.append(pl(key), style="bold")  # the key n chose first, then the others
            h.append(f" {keys.index(key) + 1}/{len(keys)}", style="dim")
            rest = [k for k in keys if k != key]
            for k in rest[:8]:
                h.append(" · " + pl(k))
            head.update(safe(h), layout=False)
            row.display = False
            return
        row.display = True
        h.append("media ", style="bold")
        h.append(pl(key))
        h.append(f" {keys.index(key) + 1}/{len(keys)} · {nkey} next · {vkey} view", style="dim")
        head.update(safe(h), layout=False)
        parent = self.runs.get(self._media_pair[1]) if self._media_pair and self._media_pair[1] else None
        side = max(10, (width - 2) // 2) if parent is not None else max(10, width)
        self.query_one("#lineage-media-b").display = parent is not None
        run = self.runs.get(got["run"])
        doc, pdoc = got["doc"], got["pdoc"]
        both = not isinstance(doc, Exception) and not isinstance(pdoc, Exception) and pentry is not None
        self.query_one("#lineage-media-a", Static).update(
            self._media_side(run, entry, doc, pdoc if both else None, side, None))
        if parent is not None:
            self.query_one("#lineage-media-b", Static).update(
                self._media_side(parent, pentry, pdoc, None, side, entry.step))

    def _media_side(self, run: Run | None, entry, doc: Any, other: Any, cols: int, wanted: int | None):
        """One side of the strip: a caption line and the item, drawn by :mod:`tui.mediaview`."""
        from rich.console import Group

        from ..mediaview import confusion_text, halfblock, histogram_text

        cap = Text(no_wrap=True, overflow="ellipsis")
        cap.append(pl(run.display_name) if run else "", style="bold")
        if entry is None:
            cap.append(" · nothing at this key", style="dim")
            return safe(cap)
        cap.append(f" · step {entry.step}")
        if wanted is not None and entry.step != wanted:
            cap.append(" (nearest)", style="yellow")
        if entry.caption:
            cap.append(" · " + pl(entry.caption), style="dim")
        if isinstance(doc, Exception):
            return Group(safe(cap), text(f"cannot show it: {doc}", "dim"))
        if entry.kind == "image":
            body: Any = halfblock(doc, cols, MEDIA_ROWS)
        elif entry.kind == "histogram" and cols < 40:  # too narrow for labelled bars: a sparkline
            from backends.media import rebin_histogram

            lo, hi, bins = rebin_histogram(doc, cols)
            # a teammate's counts are any finite numbers: negative ones draw blank, and a bin summed past
            # the float range (inf) draws full (an index from them raised IndexError/ValueError here)
            top = max((c for c in bins if c > 0), default=0)

            def level(c: float) -> str:
                return " " if not c > 0 else "█" if c >= top else "▁▂▃▄▅▆▇█"[min(7, int(c / top * 7.999))]

            body = Text()
            body.append("".join(level(c) for c in bins) if top
                        else "(an empty histogram)", style="cyan" if top else "dim")
            body.append(f"\n{lo:.3g} … {hi:.3g}" if top else "", style="dim")
        elif entry.kind == "histogram":
            body = histogram_text(doc, cols, MEDIA_ROWS - 2)
        elif entry.kind == "confusion":
            body = confusion_text(doc[0], doc[1], other, cols=cols)
        elif entry.kind == "table":
            return Group(safe(cap), self._table(doc, other))
        else:
            lines = plain(doc).splitlines()
            body = text("\n".join(line[:cols] for line in lines[:MEDIA_ROWS]))
        # a narrow side crops (v shows it whole); the renderers end without a newline, and in a Group the
        # last line would be lost
        body.no_wrap, body.overflow, body.end = True, "crop", "\n"
        return Group(safe(cap), body)

    @staticmethod
    def _table(doc, other) -> Table:
        """The first rows and columns of a logged table; cells that differ from ``other``'s in yellow."""
        from ..mediaview import table_cells

        rows = doc[1]
        head, cells = table_cells(doc, other, MEDIA_TABLE_ROWS, MEDIA_TABLE_COLS)
        t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
        for c in head:
            t.add_column(c, overflow="ellipsis", no_wrap=True)
        for row in cells:
            t.add_row(*row)
        if len(rows) > MEDIA_TABLE_ROWS:
            t.caption = f"… {len(rows) - MEDIA_TABLE_ROWS} more rows"
        return t
