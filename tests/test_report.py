"""Lineage reports: Markdown and a self-contained HTML page, with what changed at every step."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from backends.errors import LabdeckError
from backends.models import Annotation, Run
from backends.report import DIFF_MAX_LINES, MAX_CHARTS, SPARK_CHARS, build_report, pick_key_metric, write_report

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
XSS = "<script>alert(1)</script>"

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictParser(HTMLParser):
    """html.parser, plus the checks it does not make: every element closed, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.svg_polylines: list[int] = []  # polylines + circles per <svg>
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag == "svg":
            self.svg_polylines.append(0)
        if tag in ("polyline", "path") and self.svg_polylines:
            self.svg_polylines[-1] += 1
        for name, value in attrs:
            if name.startswith("on"):
                self.errors.append(f"event handler attribute {name}")
            if name in ("src", "href") and not (value or "").startswith("#"):
                self.errors.append(f"external reference {name}={value}")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> StrictParser:
    p = StrictParser()
    p.feed(page)
    p.close()
    assert not p.errors, p.errors[:5]
    assert not p.stack, f"unclosed: {p.stack}"
    return p


def svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


def mkrun(name: str, user: str, *, price: float, start: str, end: str | None, params: dict, commit: str,
          dirty: bool = False, summary: dict | None = None, **kw) -> Run:
    return Run(command=kw.pop("command", "python train.py"), instance=kw.pop("instance", "gpu-box"), name=name,
               user=user, state=kw.pop("state", "succeeded"), price_per_hour=price,
               started_at=start, ended_at=end, params=params,
               code={"commit": commit, "dirty": dirty, "files": 12}, metrics_summary=summary or {},
               instance_info={"provider": "lab", "gpus": "2× NVIDIA A100"}, **kw)


def summ(last: float, lo: float, hi: float) -> dict:
    return {"last": last, "last_step": 100, "min": lo, "max": hi, "best": lo, "count": 101}


def curve(start: float, end: float, n: int = 50) -> tuple[list[float], list[float]]:
    steps = [float(i * 2) for i in range(n)]
    return steps, [start + (end - start) * i / (n - 1) for i in range(n)]


@pytest.fixture
def lineage():
    a = mkrun("baseline-a", "alice", price=2.0, start="2026-02-01T10:00:00Z", end="2026-02-01T11:00:00Z",
              params={"lr": 0.1, "batch": 32, "dropout": 0.5}, commit="aaaaaaa1111111",
              summary={"accuracy": {"last": 0.7, "min": 0.1, "max": 0.71, "best": 0.71, "count": 50},
                       "val_loss": summ(0.9, 0.9, 2.0)},
              hardware={"gpu_util_mean": 81.4, "gpu_mem_max": 30000}, artifacts=["model.pt", "eval.json"])
    b = mkrun("more-lr", "bob", price=3.0, start="2026-02-02T10:00:00Z", end="2026-02-02T10:30:00Z",
              params={"lr": 0.3, "batch": 32, "dropout": 0.5, "warmup": 100}, commit="bbbbbbb2222222", dirty=True,
              summary={"val_loss": summ(0.7, 0.7, 2.0), "accuracy": {"last": 0.75, "min": 0.1, "max": 0.8,
                                                                      "best": 0.8, "count": 50}},
              command="python train.py --fast", parent=a.id)
    c = mkrun("no-dropout", "alice", price=4.0, start="2026-02-03T10:00:00Z", end="2026-02-03T12:00:00Z",
              params={"lr": 0.3, "batch": 32, "warmup": 100}, commit="ccccccc3333333",
              summary={"val_loss": summ(0.5, 0.5, 2.0), "accuracy": {"last": 0.8, "min": 0.1, "max": 0.8,
                                                                      "best": 0.8, "count": 50}},
              command="python train.py --fast", parent=b.id)
    d = mkrun("target-d", "carol", price=1.0, start="2026-02-04T10:00:00Z", end="2026-02-04T10:15:00Z",
              params={"lr": 0.3, "batch": 64, "warmup": 100}, commit="ddddddd4444444",
              summary={"val_loss": summ(0.45, 0.45, 2.0), "accuracy": {"last": 0.85, "min": 0.1, "max": 0.85,
                                                                        "best": 0.85, "count": 50}},
              command="python train.py --fast", parent=c.id, artifacts=["final/model.safetensors"])
    path = [a, b, c, d]
    series = {r.id: {"val_loss": curve(2.0, r.metrics_summary["val_loss"]["last"]),
                     "accuracy": curve(0.1, r.metrics_summary["accuracy"]["last"])} for r in path}
    # a NaN and an inf in one series: skipped, the line still drawn
    s, v = series[b.id]["val_loss"]
    v[10], v[20] = math.nan, math.inf
    big = "".join(f"+line {i}\n" for i in range(1000))
    code_diffs = {
        b.id: "diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n@@ -1,2 +1,2 @@\n-lr = 0.1\n+lr = 0.3\n",
        c.id: "diff --git a/weights.bin b/weights.bin\nBinary files a/weights.bin and b/weights.bin differ\n",
        d.id: big,
    }
    annotations = {
        a.id: [Annotation(run_id=a.id, kind="note", text="Solid baseline; loss plateaus.", user="alice",
                          created_at="2026-02-01T12:00:00Z"),
               Annotation(run_id=a.id, kind="tag", text="baseline", user="dave", created_at="2026-02-01T12:01:00Z")],
        b.id: [Annotation(run_id=b.id, kind="note", text=XSS, user="mallory", created_at="2026-02-02T11:00:00Z"),
               Annotation(run_id=b.id, kind="tag", text="gone-tag", user="bob", removed=True)],
        d.id: [Annotation(run_id=d.id, kind="note", text="Ship it.\nSecond line", user="carol",
                          created_at="2026-02-04T11:00:00Z"),
               Annotation(run_id=d.id, kind="note", text="removed note", user="carol", removed=True)],
    }
    return path, series, code_diffs, annotations


def report(lineage, **kw):
    path, series, code_diffs, annotations = lineage
    return build_report(path, series=series, code_diffs=code_diffs, annotations=annotations, now=NOW, **kw)


# ---------------------------------------------------------------- Markdown

def test_markdown_has_the_path_in_order_with_costs_and_key_metric(lineage) -> None:
    path = lineage[0]
    md, _ = report(lineage)
    assert md.startswith("# Lineage report: target-d\n")
    table = md.split("## Path", 1)[1].split("## Metrics over steps", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [r.display_name for r in path]
    for i, (row, run) in enumerate(zip(rows, path)):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[0].startswith(str(i))
        assert run.display_name in cells[1] and run.id[-8:].lower() in cells[1]
        assert cells[2] == run.user and cells[3] == "succeeded"
        assert "gpu-box · 2× NVIDIA A100" == cells[4]
    # costs: price_per_hour × duration
    costs = [r.strip("|").split(" | ")[6].strip() for r in rows[:4]]
    assert costs == ["$2.00", "$1.50", "$8.00", "$0.25"]
    durations = [r.strip("|").split(" | ")[5].strip() for r in rows[:4]]
    assert durations == ["1h 00m", "30m 00s", "2h 00m", "15m 00s"]
    assert "**Total**" in rows[4] and "$11.75" in rows[4]
    # key metric = the first "loss" metric of the target: value and Δ vs previous
    header = next(line for line in table.splitlines() if line.startswith("| "))
    assert "| Cost | val_loss | Δ vs previous |" in header
    key_cells = [(r.strip("|").split(" | ")[7].strip(), r.strip("|").split(" | ")[8].strip()) for r in rows[:4]]
    assert key_cells == [("0.9", "baseline"), ("0.7", "-0.2 (-22.2%)"), ("0.5", "-0.2 (-28.6%)"),
                         ("0.45", "-0.05 (-10.0%)")]
    # steps appear in order
    pos = [md.index(f"### Step {i}") for i in range(4)]
    assert pos == sorted(pos)
    assert [md.index(n, pos[0]) for n in names] == sorted(md.index(n, pos[0]) for n in names)


def test_markdown_summary(lineage) -> None:
    md, _ = report(lineage)
    summary = md.split("## Path")[0]
    assert "**target-d**" in summary and "3 steps from the baseline **baseline-a**" in summary
    assert "Worked on by alice, bob and carol." in summary
    assert "Notes and tags also from dave and mallory." in summary
    assert "**$11.75**" in summary and "3h 45m of compute" in summary
    assert "Key metric `val_loss` (last value): 0.9 → **0.45** (-0.45, -50.0%: better)." in summary


def test_markdown_what_changed(lineage) -> None:
    md, _ = report(lineage)
    step = {i: md.split(f"### Step {i}")[1].split("### Step")[0] for i in range(4)}
    # baseline: all its parameters
    assert "`lr: 0.1`" in step[0] and "`dropout: 0.5`" in step[0] and "Baseline of this report" in step[0]
    # step 1: lr changed, warmup added, command changed, commit changed (dirty)
    assert "changed `lr: 0.1 → 0.3`" in step[1]
    assert "added `warmup: 100`" in step[1]
    assert "Command: `python train.py` → `python train.py --fast`" in step[1]
    assert "Code commit: `aaaaaaa → bbbbbbb (dirty)`" in step[1]
    assert "```diff\ndiff --git a/train.py b/train.py\n" in step[1] and "+lr = 0.3\n```" in step[1]
    # step 2: dropout removed, binary marker shown as-is
    assert "removed `dropout: 0.5`" in step[2]
    assert "lr:" not in step[2].split("#### What changed")[1].split("#### Metrics")[0]
    assert "Command: unchanged (`python train.py --fast`)" in step[2]
    assert "Binary files a/weights.bin and b/weights.bin differ" in step[2]
    assert "Code commit: `bbbbbbb (dirty) → ccccccc`" in step[2]
    # step 3: batch changed; the 1,000-line diff cut at 200 with a visible note
    assert "changed `batch: 32 → 64`" in step[3]
    diff = step[3].split("```diff\n")[1].split("\n```")[0].splitlines()
    assert len(diff) == DIFF_MAX_LINES and diff[0] == "+line 0" and diff[-1] == "+line 199"
    assert "… 800 more lines" in step[3]


def test_markdown_metrics_hardware_notes_tags_artifacts(lineage) -> None:
    md, _ = report(lineage)
    step = {i: md.split(f"### Step {i}")[1].split("### Step")[0] for i in range(4)}
    metrics = step[0].split("#### Metrics")[1].split("####")[0]
    lines = [l for l in metrics.splitlines() if l.startswith("| `")]
    assert lines[0].startswith("| `val_loss` (key) | 0.9 | 0.9 | 0.9 | 2 | 101 |")  # key metric first
    assert lines[1].startswith("| `accuracy` | 0.7 | 0.71 | 0.1 | 0.71 | 50 |")
    assert "- Mean GPU util: 81%" in step[0] and "GPU memory peak: 30000" in step[0]
    assert "- **alice** · 2026-02-01 12:00 UTC: Solid baseline; loss plateaus." in step[0]
    assert "Tags: `baseline` (dave)" in step[0]
    assert "- `model.pt`" in step[0] and "- `eval.json`" in step[0]
    assert "**mallory** · 2026-02-02 11:00 UTC: \\<script\\>alert(1)\\</script\\>" in step[1]
    assert "gone-tag" not in md and "removed note" not in md
    assert "- **carol** · 2026-02-04 11:00 UTC: Ship it.\n  Second line" in step[3]
    assert "- `final/model.safetensors`" in step[3]


def test_markdown_sparklines_and_no_binary(lineage) -> None:
    md, _ = report(lineage)
    section = md.split("## Metrics over steps")[1].split("## Steps")[0]
    assert "HTML version" in section
    rows = [l for l in section.splitlines() if l.startswith("| `")]
    assert len(rows) == 2 * 4  # two metrics × four runs
    assert rows[0].startswith("| `val_loss` (key) | baseline-a")
    spark = rows[0].split(" | ")[2]
    assert set(spark) <= set(SPARK_CHARS) and spark[0] == "█" and spark[-1] == "▁"  # falling loss
    assert "<svg" not in md and "data:" not in md


# ---------------------------------------------------------------- HTML

def test_html_is_self_contained_and_parses(lineage) -> None:
    _, page = report(lineage)
    p = parse(page)
    assert page.startswith("<!DOCTYPE html>") and p.counts["html"] == 1 and p.counts["style"] == 1
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    assert "http://" not in page and "https://" not in page


def test_html_escapes_user_text(lineage) -> None:
    _, page = report(lineage)
    assert XSS not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    p = parse(page)
    assert XSS in "".join(p.text)  # shown as text
    assert "script" not in p.counts


def test_html_one_chart_per_metric_with_a_line_per_run(lineage) -> None:
    path = lineage[0]
    _, page = report(lineage)
    charts = svgs(page)
    assert len(charts) == 2
    assert "val_loss" in charts[0] and "(key metric)" in charts[0]  # key metric first
    assert "accuracy" in charts[1]
    for chart in charts:
        assert chart.count("<polyline") == len(path)
        for r in path:
            assert r.display_name in chart  # legend
        assert chart.count('class="tick"') >= 4  # ticks on both axes
        assert ">step</text>" in chart
        for pts in re.findall(r'points="([^"]*)"', chart):
            for xy in pts.split():
                x, y = map(float, xy.split(","))
                assert math.isfinite(x) and math.isfinite(y)
    # NaN and inf skipped: b's loss line has 48 of its 50 points
    b_line = re.findall(r'points="([^"]*)"', charts[0])[1]
    assert len(b_line.split()) == 48
    assert len(parse(page).svg_polylines) == 2


def test_html_content_matches_markdown(lineage) -> None:
    _, page = report(lineage)
    assert "<code>lr</code>: <code>0.1</code> → <code>0.3</code>" in page
    assert "<code>warmup</code>: <code>100</code>" in page and "removed</span> <code>dropout</code>" in page
    assert "$2.00" in page and "$1.50" in page and "$8.00" in page and "$0.25" in page and "$11.75" in page
    assert "-0.2 (-22.2%)" in page and "-0.05 (-10.0%)" in page
    assert '<span class="meta">Binary files a/weights.bin and b/weights.bin differ</span>' in page
    assert "… 800 more lines" in page
    assert "+line 199" in page and "+line 200" not in page
    assert '<span class="who">alice</span>' in page and "Solid baseline" in page
    assert "Mean GPU util: 81%" in page and "final/model.safetensors" in page


def test_single_run_path() -> None:
    r = mkrun("solo", "alice", price=1.0, start="2026-02-01T10:00:00Z", end="2026-02-01T12:00:00Z",
              params={"lr": 0.1}, commit="abcdef0123", summary={"acc": {"last": 0.5}, "train_loss": summ(0.3, 0.3, 1)})
    md, page = build_report([r], series={r.id: {"train_loss": curve(1, 0.3)}}, code_diffs={r.id: "+x\n"},
                            annotations={}, now=NOW)
    assert "single run, **solo**" in md and "its own baseline" in md
    assert "Key metric `train_loss` (last value): **0.3**." in md
    assert "$2.00" in md and "### Step 0: solo" in md and "+x" not in md
    p = parse(page)
    charts = svgs(page)
    assert len(charts) == 2 and charts[0].count("<polyline") == 1
    assert "no data" in charts[1]  # acc: a summary, no series
    assert p.counts["svg"] == 2


def test_runs_without_metrics() -> None:
    a = mkrun("a", "alice", price=1.0, start="2026-02-01T10:00:00Z", end=None, params={}, commit="", state="running")
    b = mkrun("b", "bob", price=0.0, start=None, end=None, params={"x": 1}, commit="", state="queued", parent=a.id)
    md, page = build_report([a, b], series={}, code_diffs={}, annotations={}, now=NOW)
    assert "No metrics were recorded." in md and "No metrics recorded." in md
    assert "$0.00" in md and "—" in md
    # a running run's cost runs to `now`: 28 days 2 hours × $1/h
    assert "$674.00" in md and "28d 02h" in md
    assert "Code diff: not available" in md and "added `x: 1`" in md
    assert "The target run is queued." in md
    p = parse(page)
    assert "svg" not in p.counts


def test_chart_edge_cases() -> None:
    a = mkrun("a", "alice", price=1.0, start="2026-02-01T10:00:00Z", end="2026-02-01T11:00:00Z", params={}, commit="x")
    b = mkrun("b", "bob", price=1.0, start="2026-02-01T10:00:00Z", end="2026-02-01T11:00:00Z", params={}, commit="x")
    series = {
        a.id: {"const": ([0, 1, 2], [5.0, 5.0, 5.0]), "one": ([3], [1.5]), "bad": ([0, 1], [math.nan, math.inf]),
               "empty": ([], []), "big": ([0, 1e9], [1e-9, 3e-9])},
        b.id: {"const": ([0, 1], [5.0, 5.0]), "one": ([3], [1.5])},
    }
    md, page = build_report([a, b], series=series, code_diffs={b.id: ""}, annotations={}, now=NOW, key_metric="one")
    parse(page)
    charts = svgs(page)
    assert len(charts) == 5
    by = {re.search(r'class="ctitle"[^>]*>([^<]*)', c).group(1): c for c in charts}
    assert by["one"].count("<circle") == 2 and "<polyline" not in by["one"]  # single points: markers
    assert by["const"].count("<polyline") == 2 and ">5" in by["const"]  # constant: a band around 5
    assert "no data" in by["bad"] and "no data" in by["empty"] and "<polyline" not in by["bad"]
    assert "— no data" in by["big"]  # b has no series: named in the legend
    assert "nan" not in page.lower().replace("nanoseconds", "")
    assert "Code diff: no code changes" in md
    assert "| `const` | a (" in md and "▄▄▄" in md  # constant sparkline


def test_at_most_max_charts() -> None:
    r = mkrun("r", "alice", price=1.0, start=None, end=None, params={}, commit="x")
    names = [f"m{i:02d}" for i in range(MAX_CHARTS + 3)]
    series = {r.id: {n: curve(0, 1, 5) for n in names}}
    md, page = build_report([r], series=series, code_diffs={}, annotations={}, now=NOW)
    assert len(svgs(page)) == MAX_CHARTS
    assert "Also recorded, not charted: `m06`, `m07`, `m08`." in md


def test_key_metric_choice() -> None:
    mk = lambda s: mkrun("r", "u", price=0, start=None, end=None, params={}, commit="", summary=s)  # noqa: E731
    assert pick_key_metric([mk({"acc": {}, "train_loss": {}, "val_loss": {}})]) == "train_loss"
    assert pick_key_metric([mk({"acc": {}, "f1": {}})]) == "acc"
    assert pick_key_metric([mk({"acc": {}})], key_metric="f1") == "f1"
    assert pick_key_metric([mk({"Loss": {}}), mk({})]) == "Loss"  # target has none: any run's
    r = mk({})
    assert pick_key_metric([r], {r.id: {"reward": ([], [])}}) == "reward"
    assert pick_key_metric([r]) is None


def test_hostile_text_everywhere() -> None:
    evil = '"><img src=x onerror=alert(1)>&amp;\x00\x1b\ud800|`*_[x](y)'
    a = mkrun(evil, evil, price=1.0, start="2026-02-01T10:00:00Z", end="2026-02-01T11:00:00Z",
              params={evil: evil, "nested": {"k": [1, 2]}}, commit=evil, command=evil, instance=evil,
              summary={evil: {"last": 1.0}}, artifacts=[evil])
    b = mkrun("b", "bob", price=1.0, start="2026-02-01T10:00:00Z", end="2026-02-01T11:00:00Z",
              params={"nested": {"k": [1, 3]}}, commit="x", parent=a.id)
    md, page = build_report([a, b], series={a.id: {evil: curve(0, 1)}}, code_diffs={b.id: evil + "\n" + XSS},
                            annotations={a.id: [Annotation(run_id=a.id, kind="tag", text=evil, user=evil)]},
                            title=evil, now=NOW)
    p = parse(page)
    assert "img" not in p.counts and "script" not in p.counts
    assert "<img" not in page and "\x00" not in page and "\ud800" not in page
    assert "changed `nested.k: [1, 2] → [1, 3]`" in md
    page.encode("utf-8")
    md.encode("utf-8")


def test_huge_diff_is_cheap() -> None:
    a = mkrun("a", "u", price=0, start=None, end=None, params={}, commit="1")
    b = mkrun("b", "u", price=0, start=None, end=None, params={}, commit="2")
    diff = "+" + "x" * 100_000 + "\n" + "".join(f"-{i}\n" for i in range(300_000))
    md, page = build_report([a, b], series={}, code_diffs={b.id: diff}, annotations={}, now=NOW)
    assert "… 299801 more lines" in md  # 1 + 300,000 lines, 200 shown and len(page) < 200_000
    assert "(+99601 chars)" in md


# ---------------------------------------------------------------- writing

def test_write_report_atomic(tmp_path: Path, lineage) -> None:
    md, page = report(lineage)
    out = tmp_path / "reports" / "deep"
    md_path, html_path = write_report(out, "lineage-d", md, page)
    assert md_path == out / "lineage-d.md" and html_path == out / "lineage-d.html"
    assert md_path.read_text(encoding="utf-8") == md and html_path.read_text(encoding="utf-8") == page
    write_report(out, "lineage-d", "new", "<p>new</p>")  # replaces
    assert md_path.read_text() == "new" and html_path.read_text() == "<p>new</p>"
    assert sorted(p.name for p in out.iterdir()) == ["lineage-d.html", "lineage-d.md"]  # no temp files left
    for bad in ("", "a/b", "..", "."):
        with pytest.raises(LabdeckError):
            write_report(out, bad, md, page)


def test_write_report_error_is_clear(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LabdeckError, match="Cannot write the report"):
        write_report(f / "sub", "r", "m", "h")


def test_empty_path_is_an_error() -> None:
    with pytest.raises(ValueError):
        build_report([], series={}, code_diffs={}, annotations={})
