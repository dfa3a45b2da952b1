"""The footer: Textual's, with the help key always first.

Textual's footer lists the focused widget's keys, then the screen's, then the app's, and a narrow
terminal cuts the row off on the right: at 80 columns the app's `?` was never on screen. Here the
help key comes first (and the palette key stays docked on the right), so a newcomer always sees
where every other key is listed."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

HELP_ACTIONS = ("help", "app.help")  # the app's binding, as the footer names it
TABLE_ACTIONS = ("sort(1)", "sort(-1)", "invert", "first", "last")  # every table's keys: after the tab's own


class LabdeckFooter(Footer):
    def compose(self) -> ComposeResult:
        widgets = list(super().compose())
        first = [w for w in widgets if isinstance(w, FooterKey) and w.action in HELP_ACTIONS]
        table = [w for w in widgets if isinstance(w, FooterKey) and w.action in TABLE_ACTIONS]
        app_actions = {b.action for b in getattr(self.app, "BINDINGS", ()) if hasattr(b, "action")}
        rest = [w for w in widgets if not any(w is f for f in first + table)]
        own = [w for w in rest if not (isinstance(w, FooterKey) and w.action in app_actions)]
        app = [w for w in rest if isinstance(w, FooterKey) and w.action in app_actions]
        # Textual lists the focused table's keys first, so a narrow terminal cut off the tab's own
        # actions (n New run, l Logs, …): the tab's own keys, then the table's, then the app's
        yield from first + own + table + app
