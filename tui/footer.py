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


class LabdeckFooter(Footer):
    def compose(self) -> ComposeResult:
        widgets = list(super().compose())
        first = [w for w in widgets if isinstance(w, FooterKey) and w.action in HELP_ACTIONS]
        yield from first + [w for w in widgets if not any(w is f for f in first)]
