"""Lineage: the team's runs as a tree (roots are baselines, children derive from them), loaded lazily."""

from __future__ import annotations

from collections import defaultdict

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static, Tree

from backends.models import Run

from ..format import STATE_STYLE, duration, short_id
from ..widgets import matches
from . import TabView

MAX_ROOTS = 500


class LineageTab(TabView):
    TAB_ID = "lineage"
    TITLE = "Lineage"

    def __init__(self) -> None:
        super().__init__(id="lineage-view")
        self.runs: dict[str, Run] = {}
        self.derived: dict[str | None, list[Run]] = defaultdict(list)
        self._signature: tuple = ()
        self._dirty = False  # data changed while the tab was hidden: draw when it is shown

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="lineage-left"):
                tree: Tree[str] = Tree("runs", id="lineage-tree")
                tree.show_root = False
                yield tree
                yield Static("", id="lineage-status", classes="status-line")
            yield Static("Select a run to see where it came from.", id="lineage-detail")

    def show_runs(self, runs: list[Run]) -> None:
        signature = tuple((r.id, r.state, r.parent) for r in runs)
        if signature == self._signature:
            return
        self._signature = signature
        self.runs = {r.id: r for r in runs}
        self.derived = defaultdict(list)
        for r in sorted(runs, key=lambda r: r.id):
            parent = r.parent if r.parent in self.runs else None
            self.derived[parent].append(r)
        if self.is_active_tab:
            self.rerender()
        else:
            self._dirty = True

    def shown(self) -> None:
        if self._dirty:
            self._dirty = False
            self.rerender()

    def label(self, r: Run) -> Text:
        t = Text()
        t.append(r.display_name, style="bold")
        t.append(f" {short_id(r.id)} · {r.user} · " if r.name else f" · {r.user} · ")
        t.append(r.state, style=STATE_STYLE.get(r.state, ""))
        n = len(self.derived.get(r.id, []))
        if n:
            t.append(f" · {n} derived", style="dim")
        return t

    def rerender(self) -> None:
        if not self.is_mounted:
            return
        tree = self.query_one(Tree)
        tree.clear()
        if self.filter_text:  # flat list of matches, each still expandable
            roots = [r for r in self.runs.values() if matches(self.filter_text, (r.display_name, r.user, r.state, r.command, r.id))]
            roots.sort(key=lambda r: r.id)
        else:
            roots = self.derived.get(None, [])
        total = len(roots)
        if total > MAX_ROOTS:  # the newest baselines; the filter reaches every run
            roots = roots[-MAX_ROOTS:]
        for r in roots:
            self._add(tree.root, r)
        status = self.query_one("#lineage-status", Static)
        status.update(f"showing the newest {MAX_ROOTS:,} of {total:,} " + ("matches" if self.filter_text else "baselines")
                      + ": / to narrow" if total > MAX_ROOTS else "")
        status.display = total > MAX_ROOTS
        if roots:
            tree.cursor_line = 0  # highlight the first run so its detail shows at once
        if not self.runs:
            self.query_one("#lineage-detail", Static).update(
                "No runs yet. Every run you launch lands here, under the run it was derived from "
                "(labdeck run --parent RUN …).")

    def _add(self, parent_node, r: Run) -> None:
        has_children = bool(self.derived.get(r.id))
        parent_node.add(self.label(r), data=r.id, allow_expand=has_children)

    def on_tree_node_expanded(self, event: Tree.NodeExpanded) -> None:
        node = event.node
        if node.data and not node.children:  # lazy: children are added when first opened
            for child in self.derived.get(node.data, []):
                self._add(node, child)

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        run = self.runs.get(event.node.data) if event.node.data else None
        if run is not None:
            self.query_one("#lineage-detail", Static).update(self.detail(run))

    def detail(self, r: Run) -> Text:
        t = Text()
        t.append(f"{r.display_name}\n", style="bold")
        rows = [
            ("id", r.id), ("user", r.user), ("state", r.state + (f" ({r.state_reason})" if r.state_reason else "")),
            ("instance", r.instance), ("command", r.command), ("workdir", r.workdir),
            ("parent", (self.runs[r.parent].display_name + " " + short_id(r.parent)) if r.parent in self.runs else (r.parent or "– (a baseline)")),
            ("created", r.created_at), ("duration", duration(r.duration_seconds(self.app.now()))),
            ("cost", f"${r.price_per_hour * (r.duration_seconds(self.app.now()) or 0) / 3600:.4f}" if r.price_per_hour else "–"),
            ("exit code", "–" if r.exit_code is None else str(r.exit_code)),
            ("derived runs", str(len(self.derived.get(r.id, [])))),
        ]
        for k, v in rows:
            t.append(f"{k:>12}  ", style="dim")
            t.append(f"{v}\n")
        return t
