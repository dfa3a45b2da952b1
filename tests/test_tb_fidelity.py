"""labdeck's TensorBoard reader held against TensorBoard's own ``EventAccumulator``.

Real files from a real writer (tensorboardX, the code PyTorch's SummaryWriter derives from) hold
scalars written with ``add_scalar`` and ``add_scalars`` (which writes one subdirectory per key,
the same tag in each), images, histograms and text, at steps up to 2**63 - 1. labdeck must see
the same series TensorBoard sees, keyed the way TensorBoard keys them (run subdirectory, tag),
step by step, with the steps exact.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from backends.metrics import RunSeries
from backends.tbevents import TFEventsParser, event_base, event_run, parse_find_output, remote_find_command, series_name

np = pytest.importorskip("numpy")
tensorboardX = pytest.importorskip("tensorboardX", reason="tensorboardX writes the real event files (test extra)")
event_multiplexer = pytest.importorskip(
    "tensorboard.backend.event_processing.event_multiplexer",
    reason="TensorBoard's EventAccumulator is the oracle (pip install tensorboard; in the test extra)")

BIG_STEPS = [2**53 + 1, 2**53 + 2, 2**62 + 3, 2**63 - 1]


def write_mixed(logdir: Path) -> None:
    """What a PyTorch training script typically writes, plus the int64 edge steps."""
    from tensorboardX import SummaryWriter

    w = SummaryWriter(str(logdir))
    rnd = np.random.default_rng(3)
    for i in range(40):
        w.add_scalar("loss", 1.0 / (i + 1), i)
        w.add_scalars("pair", {"train": i * 2.0, "val": i * 3.0 + 0.5}, i)
        w.add_scalars("acc/by_split", {"train": i / 40, "test": i / 50}, i)  # a '/' in the main tag
        if i % 10 == 0:
            w.add_image("samples", rnd.integers(0, 255, (3, 8, 8), dtype=np.uint8), i)
            w.add_histogram("weights", rnd.normal(0, 1, 200), i)
            w.add_text("notes", f"epoch {i}", i)
    for s in BIG_STEPS:
        w.add_scalar("big", float(s % 1000), s)
    w.add_scalar("negative", 1.5, -7)
    w.close()


def tensorboard_scalars(logdir: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    m = event_multiplexer.EventMultiplexer()
    m.AddRunsFromDirectory(str(logdir))
    m.Reload()
    out = {}
    for run, tags in m.Runs().items():
        acc = m.GetAccumulator(run)
        for tag in tags["scalars"]:
            out[(run, tag)] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def labdeck_files(logdir: Path) -> list[str]:
    res = subprocess.run(["sh", "-c", remote_find_command(str(logdir))], capture_output=True, text=True,
                         timeout=30, env=dict(os.environ))
    return parse_find_output(res.stdout)


def test_scalars_agree_with_event_accumulator_run_by_run_and_step_by_step(tmp_path: Path) -> None:
    write_mixed(tmp_path)
    want = tensorboard_scalars(tmp_path)
    # TensorBoard sees add_scalars' keys as runs of their own: pair/train, pair/val, acc_by_split/...
    assert ("pair/train", "pair") in want and ("pair/val", "pair") in want
    assert want[(".", "big")] == [(s, float(s % 1000)) for s in BIG_STEPS]

    files = labdeck_files(tmp_path)
    base = event_base(files)
    assert base == str(tmp_path)
    got: dict[str, list[tuple[int, float]]] = {}
    series = RunSeries()
    for path in files:
        p = TFEventsParser(run=event_run(path, base))
        pts = p.feed(Path(path).read_bytes()) + p.flush()
        assert not p.warnings, (path, p.warnings)
        for q in pts:
            assert type(q.step) is int
            got.setdefault(q.name, []).append((q.step, q.value))
        series.ingest(pts)
    expected = {series_name(run, tag): pts for (run, tag), pts in want.items()}
    assert sorted(got) == sorted(expected)
    for name, pts in expected.items():
        assert got[name] == pts, name  # exact: steps as ints, values as the float32 written
    assert len(expected) == 7  # loss, big, negative, pair ×2, acc/by_split ×2, and nothing else
    # the series keep train and val apart, and keep the steps exact
    summary = series.summary()
    assert summary["pair/train/pair"]["count"] == 40 and summary["pair/train/pair"]["last"] == 78.0
    assert summary["pair/val/pair"]["count"] == 40 and summary["pair/val/pair"]["last"] == 117.5
    assert summary["big"]["last_step"] == 2**63 - 1 and type(summary["big"]["last_step"]) is int
    steps, _ = series.series("big").recent_points()
    assert steps == BIG_STEPS


def test_event_base_and_runs_for_the_usual_layouts() -> None:
    r = "/home/a/runs/01HX"
    files = [f"{r}/runs/Dec05_host/events.out.tfevents.1.h", f"{r}/runs/Dec05_host/pair/train/events.out.tfevents.2.h",
             f"{r}/runs/Dec05_host/pair/val/events.out.tfevents.3.h"]
    base = event_base(files)
    assert base == f"{r}/runs/Dec05_host"
    assert [event_run(f, base) for f in files] == ["", "pair/train", "pair/val"]
    assert series_name("", "loss") == "loss" and series_name(".", "loss") == "loss"
    assert series_name("pair/train", "pair") == "pair/train/pair"
    # two writers side by side, no file above them: each keeps its own series
    two = [f"{r}/tb/a/events.out.tfevents.1.h", f"{r}/tb/b/events.out.tfevents.1.h"]
    base = event_base(two)
    assert [event_run(f, base) for f in two] == ["", "../b"]
    assert event_base([]) is None


def test_a_run_name_too_long_for_a_metric_name_is_counted_not_kept() -> None:
    import struct

    from backends.tbevents import masked_crc32c

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def fb(field: int, data: bytes) -> bytes:
        return varint(field << 3 | 2) + varint(len(data)) + data

    value = fb(1, b"loss") + varint(2 << 3 | 5) + struct.pack("<f", 1.0)
    ev = varint(2 << 3) + varint(5) + fb(5, fb(1, value))
    header = struct.pack("<Q", len(ev))
    rec = header + struct.pack("<I", masked_crc32c(header)) + ev + struct.pack("<I", masked_crc32c(ev))
    p = TFEventsParser(run="r" * 300)
    assert p.feed(rec) == [] and p.warnings["invalid metric name"] == 1
    p = TFEventsParser(run="pair/val")
    assert [(q.name, q.step) for q in p.feed(rec)] == [("pair/val/loss", 5)]


def test_media_agree_with_event_accumulator(tmp_path: Path) -> None:
    """Images (the encoded PNG, byte for byte), histograms (bucket counts and limits) and text, as
    TensorBoard reads them, by run, tag and step."""
    from backends.media import histogram_doc, tensorboard_media

    write_mixed(tmp_path)
    m = event_multiplexer.EventMultiplexer(size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    m.AddRunsFromDirectory(str(tmp_path))
    m.Reload()
    acc = m.GetAccumulator(".")
    files = labdeck_files(tmp_path)
    base = event_base(files)
    entries, warnings = tensorboard_media([(Path(f), event_run(f, base)) for f in files])
    assert not warnings
    got = {(e.key, e.step): e for e in entries}
    images = acc.Images("samples")
    assert [e.step for e in images] == [0, 10, 20, 30]
    for ev in images:
        e = got.pop(("samples", ev.step))
        assert e.kind == "image" and e.inline == ev.encoded_image_string and (e.w, e.h) == (ev.width, ev.height)
    hists = acc.Histograms("weights")
    assert len(hists) == 4
    for ev in hists:
        e = got.pop(("weights", ev.step))
        h = histogram_doc(e.inline)
        hv = ev.histogram_value
        assert h["counts"] == list(hv.bucket) and h["n"] == hv.num
        assert h["edges"][0] == hv.min and h["edges"][1:] == list(hv.bucket_limit)
    texts = acc.Tensors("notes/text_summary")
    assert len(texts) == 4
    for ev in texts:
        e = got.pop(("notes/text_summary", ev.step))
        assert e.kind == "text" and e.inline == ev.tensor_proto.string_val[0].decode()
    assert not got  # nothing TensorBoard does not have


def test_tf2_style_image_and_histogram_tensors_agree_with_event_accumulator(tmp_path: Path) -> None:
    """TF2's tf.summary.image / .histogram write tensors (plugins "images", "histograms"), here with the
    real protobuf classes and record writer; TensorBoard's accumulator and labdeck read the same."""
    import io
    import struct

    from tensorboard.util import tensor_util
    from tensorboardX import SummaryWriter
    from tensorboardX.proto import summary_pb2, tensor_pb2, tensor_shape_pb2

    from backends.media import histogram_doc, tensorboard_media

    PIL = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    PIL.new("RGB", (3, 2), (9, 99, 199)).save(buf, "PNG")
    png = buf.getvalue()

    def shape(*dims):
        return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])

    def meta(plugin):
        return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin))

    w = SummaryWriter(str(tmp_path))
    fw = w._get_file_writer()
    for step in (1, 2):
        img = tensor_pb2.TensorProto(dtype="DT_STRING", string_val=[b"3", b"2", png], tensor_shape=shape(3))
        rows = [[0.0, 1.0, 2.0 * step], [1.0, 2.5, 1.0], [2.5, 4.0, 3.0]]
        flat = [x for r in rows for x in r]
        hist_c = tensor_pb2.TensorProto(dtype="DT_DOUBLE", tensor_content=struct.pack(f"<{len(flat)}d", *flat),
                                        tensor_shape=shape(3, 3))
        hist_v = tensor_pb2.TensorProto(dtype="DT_DOUBLE", double_val=flat, tensor_shape=shape(3, 3))
        fw.add_summary(summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag="gen", tensor=img, metadata=meta("images")),
            summary_pb2.Summary.Value(tag="h_content", tensor=hist_c, metadata=meta("histograms")),
            summary_pb2.Summary.Value(tag="h_vals", tensor=hist_v, metadata=meta("histograms") if step == 1 else None),
        ]), step, walltime=100.0 + step)
    w.close()
    m = event_multiplexer.EventMultiplexer(size_guidance={"tensors": 0})
    m.AddRunsFromDirectory(str(tmp_path))
    m.Reload()
    acc = m.GetAccumulator(".")
    entries, warnings = tensorboard_media([(Path(f), "") for f in labdeck_files(tmp_path)])
    assert not warnings
    got = {(e.key, e.step): e for e in entries}
    assert sorted(got) == [("gen", 1), ("gen", 2), ("h_content", 1), ("h_content", 2), ("h_vals", 1), ("h_vals", 2)]
    for ev in acc.Tensors("gen"):
        want = tensor_util.make_ndarray(ev.tensor_proto)
        e = got[("gen", ev.step)]
        assert e.kind == "image" and e.inline == want[2] == png and (e.w, e.h) == (3, 2)
    for tag in ("h_content", "h_vals"):
        for ev in acc.Tensors(tag):
            arr = tensor_util.make_ndarray(ev.tensor_proto)
            h = histogram_doc(got[(tag, ev.step)].inline)
            assert h["counts"] == list(arr[:, 2]) and h["edges"] == [arr[0, 0], *arr[:, 1]]


def test_tensorboard_media_are_followed_incrementally(tmp_path: Path) -> None:
    """Only what an event file gained is read: the copy grows in pieces (as the monitor's mirror of a
    file being written does), cut inside records, and each item comes once."""
    from tensorboardX import SummaryWriter

    from backends.media import TensorBoardMedia

    w = SummaryWriter(str(tmp_path / "tb"))
    img = np.zeros((3, 4, 4), dtype=np.uint8)
    for step in range(3):
        w.add_image("img", img, step)
        w.add_text("t", f"text {step}", step)
    w.close()
    (path,) = labdeck_files(tmp_path / "tb")
    data = Path(path).read_bytes()
    copy = tmp_path / "copy.tfevents"
    tb = TensorBoardMedia()
    seen = []
    cuts = [0, 45, len(data) // 3, len(data) // 3 + 1, 2 * len(data) // 3, len(data) - 5, len(data)]
    for a, b in zip(cuts, cuts[1:]):
        with open(copy, "ab") as f:
            f.write(data[a:b])
        seen += [(e.key, e.step) for e in tb.update([(copy, "")])]
    assert seen == [(k, s) for s in range(3) for k in ("img", "t/text_summary")]
    assert tb.update([(copy, "")]) == []
    assert not tb.parser_warnings()


def test_a_histogram_of_more_buckets_than_are_ever_drawn_is_skipped_as_it_is_read(tmp_path: Path) -> None:
    """A 16 MiB record holds a million buckets: kept as two lists of Python floats (~64 bytes a bucket,
    counted as 16 against the 256 MiB cap) though nothing draws more than 100,000 (histogram_doc)."""
    from tensorboardX import SummaryWriter

    from backends.media import TensorBoardMedia

    w = SummaryWriter(str(tmp_path / "tb"))
    n = 200_000
    w.add_histogram_raw("big", 0.0, float(n), n, 1.0, 1.0, [float(i + 1) for i in range(n)], [1.0] * n, 1)
    w.add_histogram_raw("ok", 0.0, 3.0, 3, 1.0, 1.0, [1.0, 2.0, 3.0], [1.0, 1.0, 1.0], 1)
    w.close()
    (path,) = labdeck_files(tmp_path / "tb")
    tb = TensorBoardMedia()
    assert [e.key for e in tb.update([(Path(path), "")])] == ["ok"]
    assert tb.parser_warnings()["media item too large (skipped)"] == 1
