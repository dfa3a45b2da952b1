"""One module per tab. Each tab renders state it is given and sends intents to the app."""

from __future__ import annotations

from textual.containers import Vertical


class TabView(Vertical):
    """Base of every tab: a title, a filter it understands, and its own key bindings."""

    TAB_ID = ""
    TITLE = ""
    filter_text = ""
    FILTER_HINT = "text to match in any column"  # the `/` bar's placeholder on this tab
    HELP_NOTES: tuple[tuple[str, str], ...] = ()  # keys the tab's widgets bring (a tree's expand), for `?`
    HELP_TEXT = ""  # a paragraph `?` shows under the tab's keys (the filter syntax)

    def apply_filter(self, text: str) -> None:
        self.filter_text = text
        self.rerender()

    def on_sort_table_sort_changed(self, event) -> None:
        event.stop()
        self.rerender()

    def rerender(self) -> None:
        """Redraw from the data the tab already holds (after a filter change)."""

    def shown(self) -> None:
        """The tab became the active one (tabs that draw lazily catch up here)."""

    @property
    def is_active_tab(self) -> bool:
        from textual.widgets import TabbedContent

        try:
            return self.app.query_one(TabbedContent).active == self.TAB_ID
        except Exception:
            return False

    def focus_main(self) -> None:
        """Give focus to the tab's main widget."""
        widgets = [w for w in self.query("*") if w.can_focus]
        if widgets:
            widgets[0].focus()
