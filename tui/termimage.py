"""How the Media view draws images: terminal graphics (Kitty's graphics protocol, Sixel) or Unicode
half blocks.

The choice is made **once, before Textual takes the terminal** (:func:`setup`, called by
``tui/cli.py`` before ``app.run()``), because ``textual-image`` asks the terminal for its cell size
and its graphics support when its modules are imported, by writing a query and reading the answer
from stdin for up to 0.1 s. Once Textual runs, its input thread would read those answers as key
presses, so nothing here may import ``textual_image`` later, and tests and headless runs never call
:func:`setup`: :data:`MODE` stays ``"halfblock"``, the deterministic path.

``[ui] images`` (env ``LABDECK_IMAGES``) picks the mode: ``auto`` | ``halfblock`` | ``kitty`` |
``sixel``. ``auto`` (:func:`choose`) uses graphics only where they are known to work:

* not when stdout is not a terminal (nothing to draw on; textual-image writes to stdout);
* not inside tmux (or screen): tmux swallows Kitty/Sixel escapes unless ``allow-passthrough`` is
  on *and* each escape is wrapped in ``ESC P tmux; … ESC \\``, which textual-image does not do; the
  image would be blank. Half blocks go through tmux unchanged;
* not over SSH (``SSH_CONNECTION``/``SSH_TTY``): the terminal's answers to the probes travel the
  network and can arrive after textual-image's 0.1 s window, and then reach the TUI as stray keys;
  the usual way in is SSH through the jump host, often inside tmux as well;
* ``TERM=xterm-kitty`` (or ``KITTY_WINDOW_ID`` set) is Kitty without asking; a terminal known to
  draw images (:data:`GRAPHIC_TERMS`, :data:`GRAPHIC_PROGRAMS`) is asked by textual-image's probe
  (Sixel first, then Kitty's protocol, as it orders them); any other gets half blocks unasked, because
  the probe costs 0.4–0.8 s at every start and such terminals answer no.

``kitty``/``sixel`` force a protocol (still only when stdout is a terminal) for terminals the probe
misjudges.

The pixels come from teammates' runs: the widgets are given a Pillow image built by
:func:`pil_image` from pixels that :func:`backends.media.decode_png` already decoded within its
caps, scaled here to at most the pane's size in pixels (and at most 4× the image, as half blocks
are), so Pillow never parses a file from a run, and what reaches the terminal is textual-image's
own framing: ``ESC _ G …;<base64 PNG it encodes> ESC \\`` chunks of ≤ 4096 bytes for Kitty, or a
Sixel ``ESC P q … ESC \\`` string it encodes from those pixels.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping

from backends.config import IMAGE_MODES as MODES  # auto | halfblock | kitty | sixel

#: The mode the Media view draws with; set by :func:`setup` before the app runs.
MODE = "halfblock"
#: Why that mode (shown by ``labdeck config``-like diagnostics and the Media view's status line).
REASON = "not set up (tests, headless runs)"
#: The terminal's cell size in pixels, as textual-image measured it (None: half blocks).
CELL: tuple[int, int] | None = None

#: Scaled up at most this many times (the same bound as :func:`tui.mediaview.halfblock`).
UPSCALE = 4
#: At most this many pixels sent for one image (decode_png's own cap), and a sane cell size.
MAX_PIXELS = 16 * 1024 * 1024
MAX_CELL = (64, 128)
#: Kitty's Unicode placeholders number at most this many columns and rows (textual-image's diacritics
#: table); past that its renderable raises ValueError from the render, which would end the TUI.
KITTY_MAX_CELLS = 297


def in_tmux(env: Mapping[str, str]) -> bool:
    term = env.get("TERM", "")
    return bool(env.get("TMUX")) or term.startswith(("tmux", "screen")) or bool(env.get("STY"))


def over_ssh(env: Mapping[str, str]) -> bool:
    return bool(env.get("SSH_CONNECTION") or env.get("SSH_TTY") or env.get("SSH_CLIENT"))


def known_kitty(env: Mapping[str, str]) -> bool:
    return env.get("TERM", "") == "xterm-kitty" or bool(env.get("KITTY_WINDOW_ID"))


#: Terminals that draw Kitty graphics or Sixel (some only when enabled), told by what they put in the
#: environment. Any other terminal gets half blocks without a probe: most (xterm-256color in GNOME
#: Terminal, Windows Terminal's older builds, PuTTY) answer no after the probe's full wait.
GRAPHIC_TERMS = ("xterm-ghostty", "foot", "foot-extra", "mlterm", "contour", "wezterm", "yaft-256color")
GRAPHIC_PROGRAMS = ("WezTerm", "iTerm.app", "vscode", "ghostty", "mintty", "rio", "WarpTerminal")


def may_draw(env: Mapping[str, str]) -> bool:
    """Whether the terminal is one that may answer the graphics probe yes (so it is worth asking)."""
    return (env.get("TERM", "") in GRAPHIC_TERMS or env.get("TERM_PROGRAM", "") in GRAPHIC_PROGRAMS
            or bool(env.get("KONSOLE_VERSION") or env.get("WEZTERM_EXECUTABLE")))


def choose(setting: str, env: Mapping[str, str], *, tty: bool,
           probe: Callable[[], str | None]) -> tuple[str, str]:
    """(mode, why) for ``setting``; ``probe`` (textual-image's detection: "sixel", "kitty" or None)
    is called only when ``auto`` has nothing else to go on."""
    if setting not in MODES:
        raise ValueError(f"images must be one of: {', '.join(MODES)} (got {setting!r})")
    if setting == "halfblock":
        return "halfblock", "set to halfblock"
    if not tty:
        return "halfblock", "stdout is not a terminal"
    if setting in ("kitty", "sixel"):
        return setting, f"set to {setting}"
    if in_tmux(env):
        return "halfblock", "inside tmux/screen: graphics escapes need passthrough, which is not used"
    if over_ssh(env):
        return "halfblock", "over SSH: the terminal's answers to a graphics probe can arrive late, as keys"
    if known_kitty(env):
        return "kitty", "TERM=xterm-kitty"
    if not may_draw(env):  # the probe costs 0.4–0.8 s of every start; only terminals that can answer yes pay it
        return "halfblock", (f"the terminal (TERM={env.get('TERM', '')!r}) is not one known to draw images; "
                             "[ui] images = \"sixel\" or \"kitty\" forces a protocol")
    got = probe()
    if got in ("kitty", "sixel"):
        return got, f"the terminal answered the {got} probe"
    return "halfblock", "the terminal answered no graphics probe"


def _probe() -> str | None:
    """textual-image's own detection (imports it: only before Textual starts)."""
    from textual_image import renderable

    if renderable.Image is renderable.SixelImage:
        return "sixel"
    if renderable.Image is renderable.TGPImage:
        return "kitty"
    return None


def setup(setting: str, env: Mapping[str, str] | None = None) -> str:
    """Choose the mode for ``setting`` (``[ui] images``, which ``LABDECK_IMAGES`` overrides in
    :func:`backends.config.load_config`; see :func:`choose`) and, for graphics, import textual-image now, while the
    terminal is still ours. Returns the mode; a missing textual-image means half blocks."""
    global MODE, REASON, CELL
    env = os.environ if env is None else env
    tty = bool(sys.__stdout__ and sys.__stdout__.isatty() and sys.__stdin__ and sys.__stdin__.isatty())
    try:
        mode, why = choose(setting, env, tty=tty, probe=_probe)
        if mode != "halfblock":
            from textual_image import widget  # measures the cell size now (it caches it)
            from textual_image._terminal import get_cell_size

            cs = get_cell_size()
            CELL = (min(MAX_CELL[0], max(1, int(cs.width))), min(MAX_CELL[1], max(1, int(cs.height))))
            if tuple(cs) != CELL:  # textual-image scales every image by its own (cached) measure: make it the capped one
                setattr(get_cell_size, "_result", type(cs)(*CELL))
            del widget
    except ImportError:
        mode, why = "halfblock", "textual-image is not installed"
    except Exception as e:  # a terminal that cannot be put in cbreak mode, a closed stream: no graphics
        mode, why = "halfblock", f"textual-image could not ask the terminal ({type(e).__name__}: {e})"
    MODE, REASON = mode, why
    return mode


def target_size(w: int, h: int, cols: int, rows: int, cell: tuple[int, int]) -> tuple[int, int, int, int]:
    """(pixel width, pixel height, cells wide, cells high) for a ``w``×``h`` image in at most
    ``cols``×``rows`` cells of ``cell`` pixels: aspect kept (to the nearest cell), enlarged at most
    :data:`UPSCALE` times. The pixel size is whole cells, the size textual-image scales to, so its
    own resize is a copy and the pixels sent are exactly ours, nearest-neighbour scaled."""
    cw, ch = cell
    cols, rows = max(1, cols), max(1, rows)
    scale = min(cols * cw / w, rows * ch / h, float(UPSCALE))
    nc = max(1, min(cols, round(w * scale / cw)))
    nr = max(1, min(rows, round(h * scale / ch)))
    if nc * cw * nr * ch > MAX_PIXELS:  # a huge terminal: no more pixels than decode_png allows
        f = (MAX_PIXELS / (nc * cw * nr * ch)) ** 0.5
        nc, nr = max(1, int(nc * f)), max(1, int(nr * f))
    return nc * cw, nr * ch, nc, nr


def pil_image(px: Any, pw: int, ph: int) -> Any:
    """A Pillow RGB image of the decoded pixels ``px`` (:class:`backends.media.Pixels`), scaled to
    ``pw``×``ph`` (nearest neighbour). Pillow is given raw RGB bytes, never a file from a run."""
    from PIL import Image

    im = Image.frombytes("RGB", (px.w, px.h), bytes(px.rgb))
    if (pw, ph) != (px.w, px.h):
        im = im.resize((pw, ph), Image.Resampling.NEAREST)
    return im


def widget_class(mode: str) -> Any:
    """textual-image's widget for ``mode`` ("kitty" or "sixel"); imported after :func:`setup`
    imported the package (so the import queries nothing now)."""
    from textual_image.widget import SixelImage, TGPImage

    return TGPImage if mode == "kitty" else SixelImage
