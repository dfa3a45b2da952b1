"""How the Media view draws images (tui/termimage.py): the choice between Kitty graphics, Sixel and
half blocks, the ``[ui] images`` option, and what the Kitty and Sixel paths really send.

textual-image queries the terminal when imported, so this test process never imports it: the
drawing tests run the Media view (its real Kitty/Sixel widgets, fed real media written by the SDK
in a real process) headless in a child process whose stdout is a pipe (not a terminal: no query)
and look at the bytes it produced."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backends.config import load_config
from backends.errors import ConfigError
from backends.media import decode_png
from backends.paths import Paths
from tui import termimage
from tui.termimage import choose, target_size

REPO = Path(__file__).resolve().parents[1]


def no_probe() -> str | None:
    raise AssertionError("the terminal must not be probed here")


# ---- the choice -----------------------------------------------------------------------------------
def test_auto_inside_tmux_is_half_blocks_even_in_kitty() -> None:
    env = {"TERM": "tmux-256color", "TMUX": "/tmp/tmux-0/default,1,0", "KITTY_WINDOW_ID": "1"}
    assert choose("auto", env, tty=True, probe=no_probe)[0] == "halfblock"
    assert choose("auto", {"TERM": "screen", "STY": "1.x"}, tty=True, probe=no_probe)[0] == "halfblock"


def test_auto_in_kitty_outside_tmux_is_kitty_without_a_probe() -> None:
    assert choose("auto", {"TERM": "xterm-kitty"}, tty=True, probe=no_probe) == ("kitty", "TERM=xterm-kitty")


def test_auto_over_ssh_or_without_a_terminal_is_half_blocks() -> None:
    ssh = {"TERM": "xterm-kitty", "SSH_CONNECTION": "198.18.0.1 5000 198.18.0.2 22"}
    assert choose("auto", ssh, tty=True, probe=no_probe)[0] == "halfblock"
    assert choose("auto", {"TERM": "xterm-kitty"}, tty=False, probe=no_probe)[0] == "halfblock"
    assert choose("kitty", {"TERM": "xterm-kitty"}, tty=False, probe=no_probe)[0] == "halfblock"


def test_auto_elsewhere_asks_textual_image_and_forced_modes_do_not() -> None:
    assert choose("auto", {"TERM": "foot"}, tty=True, probe=lambda: "sixel")[0] == "sixel"
    assert choose("auto", {"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, tty=True, probe=lambda: "kitty")[0] == "kitty"
    assert choose("auto", {"TERM": "xterm-256color", "TERM_PROGRAM": "iTerm.app"}, tty=True, probe=lambda: None)[0] == "halfblock"
    # a terminal not known to draw images is not asked: the probe's wait would be paid at every start
    mode, why = choose("auto", {"TERM": "xterm-256color"}, tty=True, probe=no_probe)
    assert mode == "halfblock" and "forces a protocol" in why
    assert choose("sixel", {"TMUX": "x"}, tty=True, probe=no_probe)[0] == "sixel"  # the user knows better
    assert choose("halfblock", {"TERM": "xterm-kitty"}, tty=True, probe=no_probe)[0] == "halfblock"
    with pytest.raises(ValueError):
        choose("iterm", {}, tty=True, probe=no_probe)


def test_setup_is_never_run_here_so_the_view_draws_half_blocks() -> None:
    assert termimage.MODE == "halfblock"
    assert "textual_image" not in sys.modules


# ---- the option ------------------------------------------------------------------------------------
def test_images_option_values_and_errors(tmp_path: Path) -> None:
    paths = Paths.resolve(tmp_path)
    paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    assert load_config(paths, env={}).get("ui", "images") == "auto"
    paths.config_file.write_text('[ui]\ntheme = "textual-dark"\nimages = "sixel"\n')
    cfg = load_config(paths, env={})
    assert cfg.get("ui", "images") == "sixel" and cfg.sources["ui.images"].endswith(":3")
    cfg = load_config(paths, env={"LABDECK_IMAGES": "halfblock"})
    assert cfg.get("ui", "images") == "halfblock" and cfg.sources["ui.images"] == "environment LABDECK_IMAGES"
    with pytest.raises(ConfigError) as e:
        load_config(paths, env={"LABDECK_IMAGES": "iterm"})
    assert "LABDECK_IMAGES" in str(e.value) and "auto, halfblock, kitty, sixel" in str(e.value)
    paths.config_file.write_text('[ui]\nimages = "iterm2"\n')
    with pytest.raises(ConfigError) as e:
        load_config(paths, env={})
    assert f"{paths.config_file}:2: ui.images: 'iterm2' must be one of: auto, halfblock, kitty, sixel" in str(e.value)
    paths.config_file.write_text('[ui]\nimages = 1\n')
    with pytest.raises(ConfigError, match="ui.images: expected a string"):
        load_config(paths, env={})


def test_target_size_is_bounded_like_half_blocks() -> None:
    assert target_size(8, 8, 40, 10, (10, 20)) == (30, 40, 3, 2)  # 4× at most, whole cells
    assert target_size(1000, 10, 40, 10, (10, 20)) == (400, 20, 40, 1)  # the pane's width at most
    pw, ph, cols, rows = target_size(100_000, 100_000, 2000, 1000, (64, 128))
    assert pw * ph <= termimage.MAX_PIXELS and (pw, ph) == (cols * 64, rows * 128)


# ---- what is sent ---------------------------------------------------------------------------------
CHILD = """
import asyncio, json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.test_mediaview import CHILD_ID, MediaApp, make_run, settle
from tui import termimage

root = Path({root!r})
run = make_run(root / "runs", CHILD_ID, "quads", 1, [5])
mode = {mode!r}
termimage.setup(mode)  # stdout is a pipe: no terminal to ask; a forced mode is half blocks ...
assert termimage.MODE == "halfblock", termimage.MODE
termimage.MODE, termimage.CELL = mode, (10, 20)  # ... so force it as setup would in a terminal

async def main():
    app = MediaApp(run, None, root)  # the Media view of this one run, as test_mediaview shows it
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        pane = app.screen.query_one("#media-a")
        g = pane.graphics
        out = {{"cls": type(g).__module__ + "." + type(g).__name__, "shown": bool(g.display), "w": g.image.width, "h": g.image.height,
               "cells": [g.styles.width.value, g.styles.height.value]}}
        if mode == "sixel":
            from textual.geometry import Region
            impl = g.children[0]
            strips = impl.render_lines(Region(0, 0, impl.size.width, impl.size.height))
            out["sixel"] = "".join(seg.text for strip in strips for seg in strip)
        sys.stderr.write("RESULT" + json.dumps(out) + "\\n")
asyncio.run(main())
"""


def run_child(tmp_path: Path, mode: str) -> tuple[bytes, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABDECK_")}
    env["PYTHONPATH"] = str(REPO)
    code = textwrap.dedent(CHILD.format(repo=str(REPO), root=str(tmp_path), mode=mode))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    line = [x for x in res.stderr.decode().splitlines() if x.startswith("RESULT")][-1]
    return res.stdout, json.loads(line[len("RESULT"):])


def expected_pixels(w: int, h: int) -> list[tuple[int, int, int]]:
    """The SDK image of tests/test_mediaview.py (gain 1, step 5), nearest-neighbour scaled to w×h
    (by Pillow, as the view does: no blended colours, only the source's)."""
    from PIL import Image

    src = bytes(c for y in range(8) for x in range(8) for c in (min(255, x * 32), min(255, y * 32), 200))
    im = Image.frombytes("RGB", (8, 8), src).resize((w, h), Image.Resampling.NEAREST)
    got = [tuple(im.getpixel((x, y))) for y in range(h) for x in range(w)]
    assert set(got) <= {(src[i], src[i + 1], src[i + 2]) for i in range(0, len(src), 3)}
    return got


APC = re.compile(rb"\x1b_G([a-zA-Z]=[0-9a-zA-Z]+(?:,[a-zA-Z]=[0-9a-zA-Z]+)*)(?:;([A-Za-z0-9+/=]*))?\x1b\\")


def test_kitty_path_sends_only_graphics_protocol_chunks_of_our_pixels(tmp_path: Path) -> None:
    out, info = run_child(tmp_path, "kitty")
    assert info["cls"] == "textual_image.widget.TGPImage" and info["shown"]
    # 8×8 in a pane of ~70×25 cells of 10×20 px: enlarged 4× (32×32) and rounded to whole cells
    assert (info["w"], info["h"]) == (30, 40) and info["cells"] == [3, 2]
    msgs = list(APC.finditer(out))
    assert msgs and b"".join(m.group(0) for m in msgs) == out  # nothing but the protocol's framing
    data = [m for m in msgs if m.group(2)]
    keys = [dict(kv.split(b"=") for kv in m.group(1).split(b",")) for m in data]
    assert all(len(m.group(2)) <= 4096 for m in data)
    assert [k[b"m"] for k in keys] == [b"1"] * (len(keys) - 1) + [b"0"] and all(k[b"f"] == b"100" for k in keys)
    png = base64.b64decode(b"".join(m.group(2) for m in data), validate=True)
    px = decode_png(png)
    assert (px.w, px.h) == (30, 40)
    got = [tuple(px.rgb[i:i + 3]) for i in range(0, len(px.rgb), 3)]
    assert got == expected_pixels(30, 40)
    place = [dict(kv.split(b"=") for kv in m.group(1).split(b",")) for m in msgs if not m.group(2)]
    assert any(p.get(b"a") == b"p" and p.get(b"U") == b"1" and (p[b"c"], p[b"r"]) == (b"3", b"2") for p in place)


def decode_sixel(s: str) -> tuple[int, int, dict[tuple[int, int], tuple[int, int, int]]]:
    """A small Sixel decoder for the test: raster size and the colour of every pixel drawn."""
    m = re.match(r'\x1bP[0-9;]*q"1;1;(\d+);(\d+)', s)
    assert m and s.endswith("\x1b\\"), s[:40]
    w, h = int(m.group(1)), int(m.group(2))
    body = s[m.end():-2]
    assert re.fullmatch(r'[#!$\-0-9;?-~]*', body), "only Sixel characters inside the DCS"
    colours: dict[int, tuple[int, int, int]] = {}
    px: dict[tuple[int, int], tuple[int, int, int]] = {}
    x = band = 0
    cur = (0, 0, 0)
    for tok in re.finditer(r"#(\d+)(?:;2;(\d+);(\d+);(\d+))?|!(\d+)([?-~])|([?-~])|(\$)|(-)", body):
        reg, r, g, b, rep, rch, ch, cr, nl = tok.groups()
        if reg is not None:
            if r is not None:
                colours[int(reg)] = (int(r), int(g), int(b))
            cur = colours[int(reg)]
        elif cr:
            x = 0
        elif nl:
            x, band = 0, band + 1
        else:
            n, c = (int(rep), rch) if rep else (1, ch)
            bits = ord(c) - 63
            for i in range(n):
                for k in range(6):
                    if bits >> k & 1:
                        px[(x + i, band * 6 + k)] = cur
            x += n
    return w, h, px


def test_sixel_path_sends_one_sixel_string_of_our_pixels(tmp_path: Path) -> None:
    out, info = run_child(tmp_path, "sixel")
    assert out == b""  # the Sixel widget goes through Textual's own output, not stdout
    assert info["cls"] == "textual_image.widget.sixel.Image" and info["shown"] and (info["w"], info["h"]) == (30, 40)
    s = info["sixel"]
    start = s.index("\x1bP")
    end = s.index("\x1b\\", start) + 2
    # around it only cursor moves (ESC [ row ; col H), which Textual's renderer places it with
    assert re.fullmatch(r"(\x1b\[\d+;\d+H)*", s[:start] + s[end:])
    w, h, px = decode_sixel(s[start:end])
    assert (w, h) == (30, 40) and len(px) == 30 * 40
    want = expected_pixels(30, 40)
    for (x, y), c in px.items():  # Sixel colours are percentages: within rounding
        e = want[y * 30 + x]
        assert all(abs(a * 255 / 100 - b) <= 3 for a, b in zip(c, e)), ((x, y), c, e)


WIDE_CHILD = """
import asyncio, getpass, json, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.test_mediaview import CHILD_ID, RUNTIME, MediaApp, settle
from backends.models import Run
from tui import termimage

root = Path({root!r})
run_dir = root / "runs" / CHILD_ID
run_dir.mkdir(parents=True)
env = {{k: v for k, v in os.environ.items() if not k.startswith("LABDECK_")}}
env.update({{"PYTHONPATH": str(RUNTIME), "LABDECK_RUN_DIR": str(run_dir), "LABDECK_METRICS_FILE": str(run_dir / "m.jsonl")}})
# a teammate's 1200×8 strip: 4× wider than Kitty's placeholders can number on a 400-column terminal
sdk = "import labdeck\\nlabdeck.log({{'strip': labdeck.Image([[[x % 256, y * 30, 9] for x in range(1200)] for y in range(8)])}}, step=1)\\nlabdeck.flush()"
subprocess.run([sys.executable, "-c", sdk], env=env, check=True, timeout=60)
run = Run(command="x", instance="local", id=CHILD_ID, name="strip", user=getpass.getuser(), state="succeeded", run_dir=str(run_dir))
termimage.MODE, termimage.CELL = "kitty", (10, 20)

async def main():
    app = MediaApp(run, None, root)  # the Media view of this one run, as test_mediaview shows it
    async with app.run_test(size=(400, 40)) as pilot:
        await settle(pilot)
        g = app.screen.query_one("#media-a").graphics
        sys.stderr.write("RESULT" + json.dumps({{"shown": bool(g.display), "cells": [g.styles.width.value, g.styles.height.value],
                                                "px": [g.image.width, g.image.height]}}) + "\\n")
asyncio.run(main())
"""


def test_kitty_image_wider_than_its_placeholders_can_number_does_not_crash_the_view(tmp_path: Path) -> None:
    """Kitty's Unicode placeholders number at most 297 columns and rows (textual-image raises
    ValueError past that, from the render: the whole TUI would exit). A teammate's wide image on a
    400-column terminal is drawn 297 cells wide at most."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABDECK_")}
    env["PYTHONPATH"] = str(REPO)
    code = textwrap.dedent(WIDE_CHILD.format(repo=str(REPO), root=str(tmp_path)))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    line = [x for x in res.stderr.decode().splitlines() if x.startswith("RESULT")][-1]
    info = json.loads(line[len("RESULT"):])
    assert info["shown"] and info["cells"] == [termimage.KITTY_MAX_CELLS, 1] and info["px"] == [2970, 20]
    places = [dict(kv.split(b"=") for kv in m.group(1).split(b",")) for m in APC.finditer(res.stdout) if not m.group(2)]
    assert any(p.get(b"a") == b"p" and p[b"c"] == b"297" for p in places)


PTY_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from tui import termimage
mode = termimage.setup({setting!r}, {env!r})
out = {{"mode": mode, "why": termimage.REASON, "cell": termimage.CELL, "imported": "textual_image" in sys.modules}}
if out["imported"]:
    from textual_image._terminal import get_cell_size
    out["theirs"] = list(get_cell_size())
sys.stderr.write("RESULT" + json.dumps(out) + "\\n")
"""


def setup_in_a_pty(setting: str, env: dict[str, str], pixels: tuple[int, int]) -> tuple[dict, bytes]:
    """termimage.setup in a child whose stdin and stdout are a real pseudo-terminal of 80×24 cells and
    ``pixels`` (its TIOCGWINSZ), which answers no query; what setup chose and what it wrote there."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, *pixels))
        before = termios.tcgetattr(slave)
        code = textwrap.dedent(PTY_CHILD.format(repo=str(REPO), setting=setting, env=env))
        cenv = {k: v for k, v in os.environ.items() if not k.startswith("LABDECK_")} | {"PYTHONPATH": str(REPO)}
        res = subprocess.run([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                             env=cenv, timeout=120)
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        assert termios.tcgetattr(slave) == before  # the probes' cbreak mode was undone
        os.set_blocking(master, False)
        try:
            written = os.read(master, 65536)
        except BlockingIOError:
            written = b""
    finally:
        os.close(master)
        os.close(slave)
    line = [x for x in res.stderr.decode().splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):]), written


def test_setup_in_a_real_terminal_bounds_the_cell_size_textual_image_scales_by() -> None:
    """A terminal that reports absurd pixels (65535×65535 for 80×24 cells: 819×2730 px a cell) would
    have textual-image scale each image to pane cells × that (gigapixels); setup caps the cell size
    and textual-image uses the capped one too."""
    got, written = setup_in_a_pty("kitty", {"TERM": "xterm-256color"}, (65535, 65535))
    assert got["mode"] == "kitty" and got["imported"]
    assert got["cell"] == list(termimage.MAX_CELL) and got["theirs"] == list(termimage.MAX_CELL)
    assert b"\x1b[c" in written and b"\x1b_G" in written  # textual-image's probes did go to the terminal
    # an ordinary terminal size is kept as measured
    got, _ = setup_in_a_pty("sixel", {"TERM": "xterm-256color"}, (800, 480))
    assert got["mode"] == "sixel" and got["cell"] == [10, 20] and got["theirs"] == [10, 20]


def test_setup_auto_in_an_ordinary_or_dumb_terminal_asks_it_nothing() -> None:
    for env in ({"TERM": "xterm-256color"}, {"TERM": "dumb"}, {}):
        got, written = setup_in_a_pty("auto", env, (800, 480))
        assert got["mode"] == "halfblock" and not got["imported"] and written == b"", (env, got, written)
    # a terminal that may draw but answers nothing: asked, half blocks, and the terminal given back as it was
    got, written = setup_in_a_pty("auto", {"TERM": "foot"}, (800, 480))
    assert got["mode"] == "halfblock" and got["why"] == "the terminal answered no graphics probe" and b"\x1b[c" in written
