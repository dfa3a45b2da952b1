"""Media: the in-job SDK (labdeck.Image/Table/Histogram/Confusion/Text) in real processes, the index and
file reader on the workstation (untrusted input), the PNG decoder against Pillow, and a real run's
media fetched lazily over its transport."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backends.media import (MediaEntry, MediaError, MediaIndex, RunMedia, confusion_doc, decode_png, histogram_doc,
                            nearest_step, table_doc, text_doc)

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "backends" / "runtime"
np = pytest.importorskip("numpy")


def run_job(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    e = {k: v for k, v in os.environ.items() if not k.startswith("LABDECK_")}
    e.update({"PYTHONPATH": str(RUNTIME), "LABDECK_METRICS_FILE": str(run_dir / "metrics.jsonl"),
              "LABDECK_RUN_DIR": str(run_dir), "LABDECK_RUN_ID": "R0", "PYTHONDONTWRITEBYTECODE": "1", **env})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, env=e, capture_output=True,
                          text=True, timeout=120)


def index_of(run_dir: Path) -> MediaIndex:
    idx = MediaIndex()
    idx.feed((run_dir / "media" / "index.jsonl").read_bytes())
    assert not idx.warnings
    return idx


def test_every_kind_is_written_beside_the_metrics_and_reads_back(tmp_path: Path) -> None:
    PIL = pytest.importorskip("PIL.Image")
    png = tmp_path / "given.png"
    PIL.new("RGB", (5, 3), (10, 200, 30)).save(png)
    res = run_job(tmp_path, f"""
        import numpy as np, labdeck
        from PIL import Image as P
        rng = np.random.default_rng(7)
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        np.save("img.npy", img)
        for step in (0, 5, 2**53 + 1):
            labdeck.log({{"loss": 0.5, "samples": labdeck.Image(img, caption="real vs fake"),
                         "chw": labdeck.Image(np.ones((3, 4, 6)) * 0.5),
                         "lists": labdeck.Image([[0.0, 1.0], [0.5, 0.25]]),
                         "path": labdeck.Image({str(png)!r}),
                         "pil": labdeck.Image(P.new("RGBA", (4, 4), (255, 0, 0, 128))),
                         "per_class": labdeck.Table(["class", "f1"], [["cat", 0.9], ["<b>dog</b>", None]]),
                         "weights": labdeck.Histogram(list(range(100)), bins=4),
                         "confusion": labdeck.Confusion([0, 1, 2, 2], [0, 2, 2, 2], labels=["a", "b", "c"]),
                         "eval/notes": labdeck.Text("hello\\n[red]not markup[/red]")}}, step=step)
        img[:] = 0  # changed after log(): the logged copy is unaffected
        labdeck.flush()
    """)
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "run"
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["s"], m["m"]) for m in metrics] == [(0, {"loss": 0.5}), (5, {"loss": 0.5}), (2**53 + 1, {"loss": 0.5})]
    idx = index_of(run_dir)
    assert sorted(idx.keys()) == sorted(["samples", "chw", "lists", "path", "pil", "per_class", "weights",
                                         "confusion", "eval/notes"])
    assert idx.steps("samples") == [0, 5, 2**53 + 1]
    e = idx.get("samples", 2**53 + 1)
    assert (e.kind, e.caption, e.w, e.h, e.file) == ("image", "real vs fake", 64, 64, f"samples/{2**53 + 1}.png")
    media = run_dir / "media"
    px = decode_png((media / e.file).read_bytes())
    want = np.load(tmp_path / "img.npy")
    assert (px.w, px.h) == (64, 64) and px.rgb == want.tobytes()  # exact pixels, from before the change
    assert decode_png((media / idx.get("chw", 0).file).read_bytes()).rgb == bytes([128] * 3 * 24)  # CHW → HWC
    assert decode_png((media / idx.get("lists", 0).file).read_bytes()).rgb == bytes(
        [0] * 3 + [255] * 3 + [128] * 3 + [64] * 3)
    assert (media / idx.get("path", 5).file).read_bytes() == png.read_bytes()  # a PNG file as it was
    assert decode_png((media / idx.get("pil", 0).file).read_bytes()).rgb == bytes([128, 0, 0] * 16)  # on black
    assert (media / "eval%2Fnotes").is_dir()  # a key is one safe directory name
    cols, rows = table_doc((media / idx.get("per_class", 0).file).read_bytes())
    assert cols == ["class", "f1"] and rows == [["cat", 0.9], ["<b>dog</b>", None]]
    h = histogram_doc((media / idx.get("weights", 0).file).read_bytes())
    assert h["counts"] == [25, 25, 25, 25] and h["edges"][0] == 0 and h["edges"][-1] == 99
    labels, m = confusion_doc((media / idx.get("confusion", 0).file).read_bytes())
    assert labels == ["a", "b", "c"] and m == [[1, 0, 0], [0, 0, 1], [0, 0, 2]]
    assert text_doc((media / idx.get("eval/notes", 0).file).read_bytes()) == "hello\n[red]not markup[/red]"
    assert "Traceback" not in res.stderr


def test_a_key_past_its_cap_is_thinned_oldest_first_and_said_once(tmp_path: Path) -> None:
    res = run_job(tmp_path, """
        import labdeck
        labdeck.MEDIA_MAX_PER_KEY = 10
        for step in range(40):
            labdeck.log({"t": labdeck.Text("x" * 100)}, step=step)
        labdeck.flush()
    """)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("passed its cap") == 1
    idx = index_of(tmp_path / "run")
    steps = idx.steps("t")
    assert len(steps) <= 11 and steps[-5:] == [35, 36, 37, 38, 39] and steps[0] == 0  # spread, newest whole
    on_disk = sorted(int(p.stem) for p in (tmp_path / "run" / "media" / "t").glob("*.txt"))
    assert on_disk == steps  # the thinned files are deleted


def test_media_outside_labdeck_and_bad_values_never_raise(tmp_path: Path) -> None:
    res = run_job(tmp_path, """
        import labdeck
        labdeck.log({"bad": labdeck.Image([[1, 2], [3]]), "worse": labdeck.Confusion([1, 2], [1]),
                     "x": 1.0}, step=1)
        labdeck.flush()
        print(labdeck.media_dropped)
    """)
    assert res.returncode == 0 and res.stdout.strip() == "2"
    assert "could not be written" in res.stderr and "Traceback" not in res.stderr


# ---- the index is untrusted --------------------------------------------------------------------
def test_the_index_refuses_paths_and_entries_that_do_not_fit(tmp_path: Path) -> None:
    good = {"key": "k", "step": 3, "kind": "image", "file": "k/3.png", "size": 10}
    lines = [
        good,
        {**good, "file": "../3.png"}, {**good, "file": "/etc/3.png"}, {**good, "file": "k/../../3.png"},
        {**good, "file": "k/4.png"},  # a step that is not the entry's
        {**good, "file": "k/3.sh"}, {**good, "kind": "table"},  # a kind its extension cannot hold
        {**good, "step": 3.0}, {**good, "step": 2**64}, {**good, "size": -1}, {**good, "key": ""},
        {**good, "key": "x" * 201}, [1, 2],
    ]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines) + b"{not json\n" + b"z" * 70000 + b"\n"
    idx = MediaIndex()
    for i in range(0, len(data), 777):  # in chunks
        idx.feed(data[i:i + 777])
    assert idx.keys() == ["k"] and idx.steps("k") == [3]
    assert idx.warnings == {"invalid file": 5, "invalid entry": 7, "invalid JSON line": 1, "line too long": 1}
    idx.feed(json.dumps({"key": "k", "step": 3, "file": "k/3.png", "deleted": True}).encode() + b"\n")
    assert idx.keys() == [] and len(idx) == 0


async def test_a_huge_index_is_mirrored_and_held_only_up_to_its_bounds(tmp_path: Path, monkeypatch) -> None:
    """A job's media/index.jsonl of any size: it was mirrored whole, read into memory in one piece
    (f.read()) and parsed into up to 2,000 keys × 20,000 steps (40 million entries)."""
    import getpass

    from backends import media
    from backends.models import Run
    from backends.providers.local import LocalTransport

    monkeypatch.setattr(media, "MAX_INDEX_BYTES", 1 << 20)
    monkeypatch.setattr(media, "MAX_ENTRIES", 1000)
    rid = "01HX0000000000000000000009"
    run_dir = tmp_path / "runs" / rid
    (run_dir / "media").mkdir(parents=True)
    with open(run_dir / "media" / "index.jsonl", "w") as f:
        for k in range(30):
            for s in range(1000):
                f.write(json.dumps({"key": f"k{k}", "step": s, "kind": "text", "file": f"k{k}/{s}.txt", "size": 1}) + "\n")
    assert (run_dir / "media" / "index.jsonl").stat().st_size > 2 << 20
    run = Run(command="x", instance="local", id=rid, user=getpass.getuser(), state="succeeded", run_dir=str(run_dir))
    rm = RunMedia(run, tmp_path / "cache")
    await rm.refresh(LocalTransport(tmp_path / "runs"))
    assert len(rm.index) == 1000 and rm.index.warnings["too many entries"] > 0
    assert rm.index.warnings["index too large (not followed further)"] == 1
    assert rm.index_path.stat().st_size <= 1 << 20  # the local copy stops at the bound
    await rm.refresh(LocalTransport(tmp_path / "runs"))  # and stays there
    assert rm.index_path.stat().st_size <= 1 << 20 and len(rm.index) == 1000


async def test_parsing_a_large_index_lets_the_event_loop_run(tmp_path: Path) -> None:
    """The TUI refreshes a run's media on its event loop (the Lineage strip does so whenever the
    cursor rests on a run): an index of the SDK's most entries (500 keys × 200 steps, ~9 MB; a
    teammate's may be up to MAX_INDEX_BYTES) was parsed in one go, holding the UI for seconds. It is
    parsed in slices with the loop let run between them, and a refresh cancelled midway leaves an
    index that the next refresh completes (nothing parsed twice, nothing lost)."""
    import asyncio
    import getpass

    from backends.models import Run
    from backends.providers.local import LocalTransport

    rid = "01HX0000000000000000000007"
    run_dir = tmp_path / "runs" / rid
    (run_dir / "media").mkdir(parents=True)
    with open(run_dir / "media" / "index.jsonl", "w") as f:
        for k in range(100):
            for s in range(200):
                f.write(json.dumps({"key": f"k{k}", "step": s, "kind": "text", "file": f"k{k}/{s}.txt", "size": 1}) + "\n")
    size = (run_dir / "media" / "index.jsonl").stat().st_size
    run = Run(command="x", instance="local", id=rid, user=getpass.getuser(), state="succeeded", run_dir=str(run_dir))
    t = LocalTransport(tmp_path / "runs")
    ticks = 0
    parsing = False

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += parsing

    tick = asyncio.ensure_future(ticker())
    try:
        rm = RunMedia(run, tmp_path / "cache")
        await mirror_only(rm, t)
        parsing = True
        assert await rm.refresh(t) == 20_000 and len(rm.index) == 20_000
        parsing = False
        assert ticks >= size // (256 << 10), (ticks, size)  # the loop ran at least once every 256 KiB parsed
        # cancelled midway (the cursor moved on): the next refresh goes on where it stopped
        rm2 = RunMedia(run, tmp_path / "cache2")
        await mirror_only(rm2, t)
        task = asyncio.ensure_future(rm2.refresh(t))
        while len(rm2.index) < 5000:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert 0 < len(rm2.index) < 20_000
        await rm2.refresh(t)
        assert len(rm2.index) == 20_000 and not rm2.index.warnings
    finally:
        tick.cancel()


async def mirror_only(rm: RunMedia, transport) -> None:
    """Copy the run's index into the local mirror without parsing it (so a test times only the parse)."""
    from backends.follow import mirror

    await mirror(transport, f"{rm.remote_dir}/index.jsonl", rm.index_path, inside=rm.run.run_dir)


async def test_a_symlinked_index_or_media_file_is_refused(tmp_path: Path) -> None:
    """A job's media/index.jsonl or media file that is a link to a file of yours is not read (nor copied
    into a report): the transport opens run files without following a final link."""
    import getpass

    from backends.errors import LabdeckError
    from backends.models import Run
    from backends.providers.local import LocalTransport

    secret = tmp_path / "secret"
    secret.write_text("private")
    rid = "01HX0000000000000000000008"
    run_dir = tmp_path / "runs" / rid
    (run_dir / "media" / "k").mkdir(parents=True)
    (run_dir / "media" / "index.jsonl").symlink_to(secret)
    run = Run(command="x", instance="local", id=rid, user=getpass.getuser(), state="succeeded", run_dir=str(run_dir))
    t = LocalTransport(tmp_path / "runs")
    rm = RunMedia(run, tmp_path / "cache")
    assert await rm.refresh(t) == 0 and len(rm.index) == 0
    (run_dir / "media" / "index.jsonl").unlink()
    (run_dir / "media" / "index.jsonl").write_text(
        json.dumps({"key": "k", "step": 1, "kind": "text", "file": "k/1.txt", "size": 7}) + "\n")
    (run_dir / "media" / "k" / "1.txt").symlink_to(secret)
    assert await rm.refresh(t) == 1
    with pytest.raises(LabdeckError, match="symbolic link"):
        await rm.load(t, rm.index.get("k", 1))


def test_nearest_step() -> None:
    assert nearest_step([], 3) is None
    assert [nearest_step([0, 10, 20], s) for s in (-5, 4, 5, 6, 15, 99)] == [0, 0, 0, 10, 10, 20]


def test_malformed_media_files_are_clear_errors() -> None:
    for bad in (b"", b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + b"\x00" * 17):
        with pytest.raises(MediaError):
            decode_png(bad)
    with pytest.raises(MediaError):
        table_doc(b"[]")
    with pytest.raises(MediaError):
        confusion_doc(b'{"labels": ["a"], "matrix": [[1, 2]]}')
    with pytest.raises(MediaError):
        histogram_doc(b'{"edges": [0, 1], "counts": [1, 2]}')


def _png(w: int, h: int, color: int, depth: int, rows: bytes) -> bytes:
    import struct
    import zlib

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def test_a_png_bomb_is_refused_before_it_is_inflated() -> None:
    """A 2048×2048 16-bit RGBA PNG of zeros is ~40 KiB on disk but 32 MiB of pixel rows, which the
    pure-Python decoder took tens of seconds and hundreds of MiB to go through (per view, per step)."""
    import time

    w = h = 2048
    bomb = _png(w, h, 6, 16, (b"\x04" + bytes(w * 8)) * h)  # Paeth rows: the slowest filter
    assert len(bomb) < 200_000
    t0 = time.perf_counter()
    with pytest.raises(MediaError, match="MiB of pixel data"):
        decode_png(bomb)
    assert time.perf_counter() - t0 < 2.0
    # the same pixel count in 8-bit gray is 4 MiB of rows: still drawn
    assert decode_png(_png(w, h, 0, 8, (b"\x00" + bytes(w)) * h)).w == w


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1", "I;16"])
def test_decode_png_agrees_with_pillow(mode: str) -> None:
    PIL = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (13, 17, 4), dtype=np.uint8)
    rgba[..., :3] = rgba[..., :3] // 32 * 32  # repeated values: Pillow's optimizer uses every filter
    im = PIL.fromarray(rgba)
    im = im.convert(mode) if mode != "I;16" else PIL.fromarray(rgba[..., 0].astype(np.uint16) * 257)
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    px = decode_png(buf.getvalue())
    ref = PIL.open(io.BytesIO(buf.getvalue()))
    if ref.mode in ("RGBA", "LA") or (ref.mode == "P" and "transparency" in ref.info):
        a = np.asarray(ref.convert("RGBA"), dtype=np.uint16)
        want = (a[..., :3] * a[..., 3:4] // 255).astype(np.uint8)
    elif ref.mode.startswith("I"):
        want = np.repeat((np.asarray(ref, dtype=np.uint16) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    else:
        want = np.asarray(ref.convert("RGB"))
    assert (px.w, px.h) == (17, 13)
    assert px.rgb == want.tobytes()


# ---- a real run's media, fetched lazily over its transport --------------------------------------
async def test_a_runs_media_are_fetched_on_demand_and_cached(workstation, tmp_path: Path) -> None:
    from tests.test_monitor import follow_to_end

    code = ("import labdeck\n"
            "for s in range(3):\n"
            "    labdeck.log({'acc': s / 3, 'img': labdeck.Image([[s / 2, 0.0], [1.0, 0.5]]),"
            " 'cm': labdeck.Confusion([0, 1, 1], [0, 1, s % 2], labels=['cat', 'dog'])}, step=s * 10)\n")
    (tmp_path / "mjob.py").write_text(code)
    run = await workstation.launch(f"{sys.executable} mjob.py", workdir=str(tmp_path))
    done = await follow_to_end(workstation, run.id)
    assert done.state == "succeeded"
    transport = await workstation.transport(done.instance)

    class Counting:
        reads = 0

        async def read_file(self, *a, **kw):
            Counting.reads += 1
            return await transport.read_file(*a, **kw)

    rm = RunMedia(done, tmp_path / "cache")
    assert await rm.refresh(Counting()) == 6
    assert sorted(rm.index.keys()) == ["cm", "img"] and rm.index.steps("img") == [0, 10, 20]
    Counting.reads = 0
    entry = rm.index.nearest("img", 14)
    assert entry.step == 10 and rm.cached(entry) is None  # nothing fetched until asked for
    data = await rm.load(Counting(), entry)
    assert Counting.reads >= 1 and decode_png(data).rgb == bytes([128] * 3 + [0] * 3 + [255] * 3 + [128] * 3)
    n = Counting.reads
    assert await rm.load(Counting(), entry) == data and Counting.reads == n  # cached
    cached = rm._cache_path(entry)
    assert cached.stat().st_mode & 0o777 == 0o600 and cached.is_relative_to(tmp_path / "cache")
    rm2 = RunMedia(done, tmp_path / "cache")  # a later session: from the disk cache
    await rm2.refresh(Counting())
    n = Counting.reads
    assert await rm2.load(Counting(), rm2.index.get("img", 10)) == data and Counting.reads == n
    labels, m = confusion_doc(await rm.load(transport, rm.index.get("cm", 20)))
    assert labels == ["cat", "dog"] and m == [[1, 0], [1, 1]]
    assert await rm.refresh(Counting()) == 0  # nothing new


def test_entry_equality_ignores_inline_payloads() -> None:
    a = MediaEntry("k", 1, "text", inline="x")
    b = MediaEntry("k", 1, "text", inline="y")
    assert a == b


# ---- the stakeholder report -----------------------------------------------------------------------
def test_report_embeds_media_escaped_and_self_contained() -> None:
    import base64
    from datetime import datetime, timezone

    from backends.media import ReportMedia
    from backends.models import Run
    from backends.report import build_report

    PIL = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    PIL.new("RGB", (4, 4), (200, 10, 10)).save(buf, "PNG")
    png = buf.getvalue()
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    a = Run(command="python train.py", instance="local", id="01HX0000000000000000000001", name="base",
            state="succeeded")
    b = Run(command="python train.py --wide", instance="local", id="01HX0000000000000000000002", name="wide",
            state="succeeded", parent=a.id)
    media = {
        a.id: [ReportMedia("cm", 10, "confusion", (["cat", evil], [[5, 1], [2, 7]]))],
        b.id: [ReportMedia(evil, 20, "image", png, caption=evil),
               ReportMedia("per_class", 20, "table", (["class", evil], [["cat", 0.91], [evil, None]])),
               ReportMedia("cm", 20, "confusion", (["cat", evil], [[6, 0], [1, 8]])),
               ReportMedia("w", 20, "histogram", {"edges": [0.0, 1.0, 2.0], "counts": [3.0, 1.0], "n": 4.0}),
               ReportMedia("notes", 20, "text", evil + "\nline two"),
               ReportMedia("gif?", 20, "image", b"not an image")],
    }
    md, page = build_report([a, b], series={}, code_diffs={b.id: ""}, annotations={},
                            now=datetime(2026, 1, 2, tzinfo=timezone.utc), media=media)
    assert "<script" not in page and "onerror=alert" not in page.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;" in page
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page  # the image inline
    assert page.count('<svg class="confusion"') == 2 and '<svg class="histogram"' in page
    assert "<td>cat</td>" in page and '<td class=num>0.91</td>' in page
    assert "Not an image labdeck embeds." in page
    assert "default-src 'none'" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "#### Media" in md and "embedded in the HTML report" in md
    assert "\\<script\\>" in md  # outside code spans, escaped (inside them it is shown as code)
    assert "| cat | 5 | 1 |" in md  # the parent's confusion matrix as a Markdown table


async def test_report_cli_embeds_a_real_runs_media(workstation, home: Path, tmp_path: Path) -> None:
    import asyncio

    from tests.test_cli import labdeck
    from tests.test_monitor import follow_to_end

    (tmp_path / "job.py").write_text(
        "import labdeck\n"
        "labdeck.log({'acc': 0.5, 'img': labdeck.Image([[0.0, 1.0], [1.0, 0.0]], caption='grid'),"
        " 'cm': labdeck.Confusion([0, 1, 1], [0, 1, 0], labels=['no', 'yes'])}, step=3)\n")
    run = await workstation.launch(f"{sys.executable} job.py", workdir=str(tmp_path), name="media-report")
    assert (await follow_to_end(workstation, run.id)).state == "succeeded"
    out = tmp_path / "out"
    res = await asyncio.to_thread(labdeck, home, "report", run.id, "--media", "img", "--media", "cm",
                                  "--media", "nope", "-o", str(out))
    assert res.returncode == 0, res.stderr
    page = next(out.glob("*.html")).read_text()
    assert "data:image/png;base64," in page and '<svg class="confusion"' in page and "img · step 3 · grid" in page
    res = await asyncio.to_thread(labdeck, home, "report", run.id, "--media", "nope", "-o", str(out))
    assert res.returncode == 0 and "no run of the path has logged nope" in res.stderr

    # labdeck media: the keys, one key's steps, as tables and as JSON
    res = await asyncio.to_thread(labdeck, home, "media", run.id, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [
        {"key": "img", "kind": "image", "source": "labdeck", "count": 1, "first_step": 3, "last_step": 3},
        {"key": "cm", "kind": "confusion", "source": "labdeck", "count": 1, "first_step": 3, "last_step": 3}]
    res = await asyncio.to_thread(labdeck, home, "media", run.id, "img", "--json")
    (item,) = json.loads(res.stdout)
    assert (item["step"], item["width"], item["height"], item["caption"], item["file"]) == (3, 2, 2, "grid", "img/3.png")
    res = await asyncio.to_thread(labdeck, home, "media", run.id)
    assert res.returncode == 0 and "img" in res.stdout and "confusion" in res.stdout
    res = await asyncio.to_thread(labdeck, home, "media", run.id, "[red]nope")
    assert res.returncode != 0 and "has logged no media under '[red]nope'" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_jpeg_file_becomes_a_png_where_pillow_is_importable(tmp_path: Path) -> None:
    PIL = pytest.importorskip("PIL.Image")
    jpg = tmp_path / "photo.jpg"
    PIL.new("RGB", (6, 4), (0, 0, 255)).save(jpg, "JPEG")
    res = run_job(tmp_path, f"""
        import labdeck
        labdeck.log({{"photo": labdeck.Image({str(jpg)!r})}}, step=1)
        labdeck.flush()
    """)
    assert res.returncode == 0, res.stderr
    e = index_of(tmp_path / "run").get("photo", 1)
    assert e.file == "photo/1.png" and (e.w, e.h) == (6, 4)
    px = decode_png((tmp_path / "run" / "media" / e.file).read_bytes())
    assert px.rgb[2] > 200 and px.rgb[0] < 50  # blue, through JPEG's loss


async def test_a_media_directory_that_links_to_one_of_yours_is_refused(tmp_path: Path) -> None:
    """A teammate's ``media/<key>`` (or ``media`` itself) made a link to a directory of yours: a file
    there named like a step (``5.txt``) is not read, so it never reaches your screen or a report you
    share. Checked for every directory from the run directory down (local transport)."""
    import getpass

    from backends.errors import LabdeckError
    from backends.models import Run
    from backends.providers.local import LocalTransport

    mine = tmp_path / "alice-notes"
    mine.mkdir()
    (mine / "5.txt").write_text("private")
    rid = "01HX0000000000000000000009"
    run_dir = tmp_path / "runs" / rid
    (run_dir / "media").mkdir(parents=True)
    (run_dir / "media" / "index.jsonl").write_text(
        json.dumps({"key": "k", "step": 5, "kind": "text", "file": "k/5.txt", "size": 7}) + "\n")
    (run_dir / "media" / "k").symlink_to(mine, target_is_directory=True)
    run = Run(command="x", instance="local", id=rid, user=getpass.getuser(), state="succeeded", run_dir=str(run_dir))
    t = LocalTransport(tmp_path / "runs")
    rm = RunMedia(run, tmp_path / "cache")
    assert await rm.refresh(t) == 1
    with pytest.raises(LabdeckError, match="symbolic link"):
        await rm.load(t, rm.index.get("k", 5))
    # the whole media directory a link: not even the index is read
    other = tmp_path / "elsewhere"
    (run_dir / "media").rename(other)
    (other / "k").unlink()
    (run_dir / "media").symlink_to(other, target_is_directory=True)
    rm2 = RunMedia(run, tmp_path / "cache2")
    assert await rm2.refresh(t) == 0 and len(rm2.index) == 0


async def test_a_linked_directory_below_the_run_is_refused_over_ssh(ssh_server, ssh_client_key, tmp_path: Path) -> None:
    """The same over SFTP: one lstat per directory below the run directory."""
    from backends.errors import LabdeckError
    from backends.ssh import KnownHosts, SSHPool, SSHTransport
    from tests.test_ssh_unit import spec_for

    home = Path(ssh_server.home)
    (home / "notes").mkdir()
    (home / "notes" / "5.txt").write_text("private")
    run_dir = home / "runs" / "R"
    (run_dir / "media").mkdir(parents=True)
    (run_dir / "media" / "k").symlink_to(home / "notes", target_is_directory=True)
    (run_dir / "media" / "ok.txt").write_text("fine")
    pool = SSHPool(KnownHosts(tmp_path / "known_hosts"))
    t = SSHTransport(pool, spec_for(ssh_server, str(ssh_client_key)), instance="test")
    try:
        with pytest.raises(LabdeckError, match="symbolic link"):
            await t.read_file(f"{run_dir}/media/k/5.txt", inside=str(run_dir))
        assert (await t.read_file(f"{run_dir}/media/ok.txt", inside=str(run_dir))).data == b"fine"
        with pytest.raises(LabdeckError, match="not inside"):
            await t.read_file(f"{home}/notes/5.txt", inside=str(run_dir))
    finally:
        await pool.close()


# ---- choosing the step of the report's media ------------------------------------------------------
def test_media_choice_and_the_step_at_or_before() -> None:
    from backends.media import ReportMedia, parse_media_choice
    from backends.report import _media_label

    assert parse_media_choice("img") == ("img", None)
    assert parse_media_choice("img@40") == ("img", 40) and parse_media_choice("img@-3") == ("img", -3)
    assert parse_media_choice("a@b@latest") == ("a@b", None) and parse_media_choice("a@b@7") == ("a@b", 7)
    for bad in ("img@x", "img@", "img@1.5", "@4", "img@99999999999999999999"):
        with pytest.raises(MediaError):
            parse_media_choice(bad)
    idx = MediaIndex()
    for s in (10, 20, 40):
        idx.feed((json.dumps({"key": "k", "step": s, "kind": "text", "file": f"k/{s}.txt", "size": 1}) + "\n").encode())
    assert [idx.at_or_before("k", s).step for s in (10, 19, 20, 39, 40, 10**6, 9, -5)] == [10, 10, 20, 20, 40, 40, 10, 10]
    assert idx.at_or_before("nope", 5) is None
    assert _media_label(ReportMedia("k", 20, "text", "t")) == "k · step 20"
    assert _media_label(ReportMedia("k", 20, "text", "t", asked=20)) == "k · step 20"
    assert _media_label(ReportMedia("k", 20, "text", "t", "c", asked=30)) == "k · step 20 (nearest at or before 30) · c"
    assert _media_label(ReportMedia("k", 10, "text", "t", asked=9)) == "k · step 10 (its earliest; none at or before 9)"


async def test_report_cli_chooses_the_media_step_along_the_path(workstation, home: Path, tmp_path: Path) -> None:
    """``--media KEY@STEP``: for each run of the lineage path its latest step at or below STEP (its
    earliest when it has none), each item labelled with its real step; ``--media-step`` for bare
    keys; a malformed step is a usage error (exit 2)."""
    import asyncio

    from tests.test_cli import labdeck
    from tests.test_monitor import follow_to_end

    (tmp_path / "job.py").write_text(
        "import labdeck, sys\n"
        "off = int(sys.argv[1])\n"
        "for s in (0, 10, 20):\n"
        "    labdeck.log({'img': labdeck.Image([[s / 20, 0.0], [1.0, 0.5]], caption=f'at {s}')}, step=s + off)\n"
        "labdeck.log({'late': labdeck.Text('only late')}, step=30)\n")
    parent = await workstation.launch(f"{sys.executable} job.py 0", workdir=str(tmp_path), name="media-parent")
    assert (await follow_to_end(workstation, parent.id)).state == "succeeded"
    child = await workstation.launch(f"{sys.executable} job.py 5", workdir=str(tmp_path), name="media-child",
                                     parent=parent.id)
    assert (await follow_to_end(workstation, child.id)).state == "succeeded"
    out = tmp_path / "out"
    res = await asyncio.to_thread(labdeck, home, "report", child.id, "--media", "img@15", "--media", "late@15",
                                  "-o", str(out))
    assert res.returncode == 0, res.stderr
    page = next(out.glob("*.html")).read_text()
    # the parent (steps 0, 10, 20): 10; the child (steps 5, 15, 25): exactly 15
    assert "img · step 10 (nearest at or before 15) · at 10" in page and "img · step 15 · at 10" in page
    assert page.count("late · step 30 (its earliest; none at or before 15)") == 2
    md = next(out.glob("*.md")).read_text()
    assert "`img` at step 10 (nearest at or before 15)" in md and "`img` at step 15: at 10" in md
    for f in out.iterdir():
        f.unlink()
    res = await asyncio.to_thread(labdeck, home, "report", child.id, "--media", "img", "--media-step", "20",
                                  "--media", "late@latest", "-o", str(out))
    assert res.returncode == 0, res.stderr
    page = next(out.glob("*.html")).read_text()
    assert "img · step 20 · at 20" in page and "img · step 15 (nearest at or before 20) · at 10" in page
    assert page.count("late · step 30 · only") == 0 and page.count("late · step 30<") == 2
    for args in (["--media", "img@x"], ["--media", "@3"], ["--media-step", "5"], ["--media-step", "x", "--media", "img"]):
        res = await asyncio.to_thread(labdeck, home, "report", parent.id, *args, "-o", str(out))
        assert res.returncode == 2 and "Traceback" not in res.stderr, (args, res.stderr)
    res = await asyncio.to_thread(labdeck, home, "report", parent.id, "--media", "img@x", "-o", str(out))
    assert "the step after '@' must be a whole number" in res.stderr
