"""Child process of bench_tui_start: start one app headless, record when things happen, exit.

Usage: ``python3 _tui_driver.py MODE OUT.json`` with ``LABDECK_BENCH_T0`` set to
the parent's ``time.perf_counter()`` just before it spawned this process
(CLOCK_MONOTONIC: the same clock in every process on Linux), so every mark
counts interpreter start-up and imports.

MODE:
  empty           an empty ``textual.app.App``: first frame, then exit
  labdeck         ``LabdeckApp(Workstation.open(LABDECK_HOME), live=False)``: first frame,
                  then polls until the Jobs table holds rows and one more frame is drawn
  labdeck-frame   the same app, exits at its first frame (an empty store has no rows to wait for)

Marks written (seconds since T0): python (this file starts running), imported, built (app
object made), first_frame (Textual's Ready: DOM ready and first frame drawn), rows (the Jobs
DataTable has rows), rows_painted (the frame after that), exited.

``LABDECK_BENCH_PROFILE=FILE`` writes a cProfile of the main thread to FILE.
"""

from __future__ import annotations

import os
import sys
import time

T0 = float(os.environ["LABDECK_BENCH_T0"])
MARKS: dict[str, float | int | str] = {"python": time.perf_counter() - T0}
SIZE = (160, 48)  # a typical terminal, not Textual's 80×24 default
POLL_S = 0.005
GIVE_UP_S = 60.0


def since() -> float:
    return time.perf_counter() - T0


def run(mode: str) -> None:
    from textual.app import App

    if mode == "empty":
        class Probe(App[None]):
            def on_ready(self) -> None:
                MARKS["first_frame"] = since()
                self.exit()

        MARKS["imported"] = since()
        app: App = Probe()
    else:
        from textual.widgets import DataTable

        from backends.workstation import Workstation
        from tui.app import LabdeckApp

        MARKS["imported"] = since()

        import inspect
        from pathlib import Path

        class LabdeckProbe(LabdeckApp):
            # Textual resolves a relative CSS_PATH next to the subclass's file: point it back at tui/
            CSS_PATH = str(Path(inspect.getfile(LabdeckApp)).parent / LabdeckApp.CSS_PATH)

            def on_ready(self) -> None:
                MARKS["first_frame"] = since()
                if mode == "labdeck-frame":
                    self.exit()
                    return
                self.set_timer(GIVE_UP_S, self._give_up)
                self.set_interval(POLL_S, self._poll)
                self._poll()

            def _poll(self) -> None:
                if "rows" in MARKS:
                    return
                n = self.jobs_tab.query_one(DataTable).row_count
                if n:
                    MARKS["rows"] = since()
                    MARKS["row_count"] = n
                    MARKS["runs_loaded"] = len(self.jobs_tab.runs)
                    self.call_after_refresh(self._painted)

            def _painted(self) -> None:
                MARKS["rows_painted"] = since()
                self.exit()

            def _give_up(self) -> None:
                MARKS["error"] = f"no rows in the Jobs table after {GIVE_UP_S:g} s"
                self.exit()

        app = LabdeckProbe(Workstation.open(os.environ["LABDECK_HOME"]), live=False)
    MARKS["built"] = since()
    app.run(headless=True, size=SIZE)
    MARKS["exited"] = since()
    if app.return_code:
        MARKS["error"] = f"app exited with return code {app.return_code}"


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    prof_path = os.environ.get("LABDECK_BENCH_PROFILE")
    try:
        if prof_path:
            import cProfile

            prof = cProfile.Profile()
            prof.runcall(run, mode)
            prof.dump_stats(prof_path)
        else:
            run(mode)
    except BaseException as e:  # report, don't hide: the parent shows it
        MARKS["error"] = f"{type(e).__name__}: {e}"
    import json

    with open(out, "w", encoding="utf-8") as f:
        json.dump(MARKS, f)


if __name__ == "__main__":
    main()
