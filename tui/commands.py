"""The Ctrl+P palette's labdeck provider: tabs, actions, and the runs on screen.

Run names, users and commands come from teammates' stores: every prompt and help text is
handed to the palette as :class:`~textual.content.Content` (plain text), never as markup."""

from __future__ import annotations

from functools import partial

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.content import Content
from textual.fuzzy import Matcher

from backends.text import plain_line


def highlighted(matcher: Matcher, name: str) -> Content:
    """``name`` as plain text with the matched characters styled (``Matcher.highlight`` parses markup)."""
    content = Content(name)
    _, offsets = matcher.fuzzy_search.match(matcher.query, name)
    for offset in offsets:
        if not name[offset].isspace():
            content = content.stylize(matcher.match_style, offset, offset + 1)
    return content


class LabdeckCommands(Provider):
    def _commands(self):
        app = self.app
        out = [(f"Go to {title}", f"Switch to the {title} tab", partial(app.action_switch_tab, tab_id))
               for tab_id, title in app.TAB_TITLES.items()]
        out += [
            ("Run the bundled example on local", "A small numpy training job; watch it in Jobs", app.action_run_example),
            ("Refresh everything", "Reload instances, runs and deployments now", app.action_refresh),
            ("Show keys", "Help for the current tab", app.action_help),
            ("Filter the current list", "Same as /", app.action_filter),
            ("Quit labdeck", "Jobs keep running on their instances", app.action_quit),
        ]
        tab = app.active_tab()
        for b in tab.BINDINGS:  # the current tab's actions, as its footer and `?` name them ("serve" finds Serve)
            if isinstance(b, Binding) and tab.check_action(b.action, ()) is not False:
                key = app.key_of(b.id) if b.id else b.key
                out.append((f"{tab.TITLE}: {b.description} ({key})", b.tooltip or b.description,
                            partial(tab.run_action, b.action)))
        jobs = app.jobs_tab
        for run in jobs.runs[:200]:
            out.append((plain_line(f"Logs of {run.display_name} ({run.state}, {run.user})"), plain_line(run.command[:200])[:80],
                        partial(app.open_log, run)))
        return out

    async def discover(self) -> Hits:
        for name, help_text, callback in self._commands()[:8]:
            yield DiscoveryHit(Content(name), callback, help=Content(help_text))

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, callback in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, highlighted(matcher, name), callback, text=name, help=Content(help_text))
