"""Data prep (shards equal an independent encoding, worker-count invariant, resumable) and the loader."""

import errno
import glob
import gzip
import json
import lzma
import os
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import tiktoken
import torch

import data.prepare as prep
from data.loader import TrainLoader, ValSet, find_shards
from data.shards import HEADER_BYTES, open_shard, read_header, write_shard

from conftest import ROOT, SHARED

WIKI_VAL = os.path.join(SHARED, "enwiki_wikiextractor", "enwiki_wikiextractor_val.jsonl.xz")
SHAKESPEARE = os.path.join(SHARED, "tinyshakespeare", "input.txt")
needs_shared = pytest.mark.skipif(not os.path.exists(WIKI_VAL), reason="../shared/data is not beside the checkout")


@pytest.fixture(scope="module")
def wiki_docs():
    with lzma.open(WIKI_VAL, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:60]


@pytest.fixture
def wiki_jsonl(tmp_path, wiki_docs):
    path = tmp_path / "wiki.jsonl"
    with open(path, "w") as f:
        for d in wiki_docs:
            f.write(json.dumps({"id": 1, "text": d}, ensure_ascii=False) + "\n")
    return str(path)


def run(files, out_dir, **kw):
    kw.setdefault("shard_size", 20_000)
    kw.setdefault("val_tokens", 30_000)
    return prep.prepare(files, str(out_dir), "wiki", "test", progress=False, **kw)


def shard_bytes(out_dir):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out_dir, "*.bin")))}


def stream(out_dir):
    val = [np.asarray(open_shard(p)) for p in find_shards(out_dir, "val")]
    train = [np.asarray(open_shard(p)) for p in find_shards(out_dir, "train")]
    return val, train


@needs_shared
def test_round_trip(tmp_path, wiki_jsonl, wiki_docs, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_BYTES", 50_000)  # many work units
    meta = run([wiki_jsonl], tmp_path / "out", workers=2, max_tokens=150_000)
    enc = tiktoken.get_encoding("gpt2")
    expected = []
    for d in wiki_docs:  # independent encoding: EOT before every document
        expected += [enc.eot_token] + enc.encode_ordinary(d)
    expected = np.array(expected[:150_000], dtype=np.uint16)
    val, train = stream(tmp_path / "out")
    assert [len(s) for s in val] == [20_000, 10_000]  # the first val_tokens, split at shard_size
    assert [len(s) for s in train][:-1] == [20_000] * (len(train) - 1)
    np.testing.assert_array_equal(np.concatenate(val + train), expected)
    assert meta["tokens"] == dict(val=30_000, train=120_000)
    assert meta["documents"]["val"] == int((expected[:30_000] == enc.eot_token).sum())
    assert meta["documents"]["train"] == int((expected[30_000:] == enc.eot_token).sum())
    assert [s["name"] for s in meta["shards"]][:3] == ["wiki_val_000000.bin", "wiki_val_000001.bin", "wiki_train_000000.bin"]
    assert prep.check(str(tmp_path / "out"), progress=False) == dict(val=dict(shards=2, tokens=30_000),
                                                                     train=dict(shards=6, tokens=120_000))


@needs_shared
def test_workers_and_formats_give_identical_shards(tmp_path, wiki_jsonl, wiki_docs, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_BYTES", 40_000)
    outs = []
    for w in (1, 2, 3):
        run([wiki_jsonl], tmp_path / f"w{w}", workers=w)
        outs.append(shard_bytes(tmp_path / f"w{w}"))
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 5
    # the same documents as compressed JSON lines (zstd, xz) and as parquet
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    raw = open(wiki_jsonl, "rb").read()
    (tmp_path / "wiki.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "wiki.jsonl.xz").write_bytes(lzma.compress(raw))
    pq.write_table(pa.table({"text": wiki_docs}), tmp_path / "wiki.parquet", row_group_size=7)
    for name in ("wiki.jsonl.zst", "wiki.jsonl.xz", "wiki.parquet"):
        run([str(tmp_path / name)], tmp_path / name.replace(".", "_"), workers=2)
        assert shard_bytes(tmp_path / name.replace(".", "_")) == outs[0], name


@needs_shared
def test_resume_after_crash_is_byte_identical(tmp_path, wiki_jsonl, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_BYTES", 40_000)
    run([wiki_jsonl], tmp_path / "ref", workers=2)
    real_write, calls = prep.write_shard, []

    def crashing_write(path, tokens):
        calls.append(path)
        if len(calls) == 5:  # die half-way through the fifth shard
            with open(path + ".tmp", "wb") as f:
                f.write(b"\0" * 100)
            raise RuntimeError("simulated crash")
        real_write(path, tokens)

    monkeypatch.setattr(prep, "write_shard", crashing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run([wiki_jsonl], tmp_path / "out", workers=2)
    assert len(glob.glob(str(tmp_path / "out" / "*.bin"))) == 4  # no half-written shard under a final name
    state = json.load(open(tmp_path / "out" / prep.STATE))
    assert len(state["shards"]) == 4 and (state["unit"], state["skip"]) != (0, 0)
    monkeypatch.setattr(prep, "write_shard", real_write)
    with pytest.raises(SystemExit, match="other settings"):
        run([wiki_jsonl], tmp_path / "out", workers=2, shard_size=10_000)
    run([wiki_jsonl], tmp_path / "out", workers=3)  # resume, with another worker count
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")
    assert not os.path.exists(tmp_path / "out" / prep.STATE) and not glob.glob(str(tmp_path / "out" / "*.tmp"))
    assert json.load(open(tmp_path / "out" / "meta.json")) == json.load(open(tmp_path / "ref" / "meta.json"))
    run([wiki_jsonl], tmp_path / "out", workers=2)  # already complete: nothing to do
    with pytest.raises(SystemExit, match="other settings"):
        run([wiki_jsonl], tmp_path / "out", workers=2, val_tokens=10)


@needs_shared
def test_shakespeare_cli(tmp_path, capsys):
    prep.main(["shakespeare", f"--input={SHAKESPEARE}", f"--out_dir={tmp_path}", "--workers=1"])
    prep.main(["check", str(tmp_path)])
    out = capsys.readouterr().out
    assert "val: 1 shards, 32,768 tokens" in out and "train: 1 shards, 305,258 tokens" in out


def test_prep_errors(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ValueError, match="a.jsonl: the line at byte 0 has no field 'text'.*--text_field"):
        run([str(tmp_path / "a.jsonl")], tmp_path / "o1", workers=1)
    meta = run([str(tmp_path / "a.jsonl")], tmp_path / "o2", workers=1, text_field="content", val_tokens=1)
    assert meta["tokens"] == dict(val=1, train=1)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="produced no documents"):
        run([str(tmp_path / "empty.jsonl")], tmp_path / "o3", workers=1)
    with pytest.raises(ValueError, match="all 2 tokens .* went to the val split"):
        run([str(tmp_path / "a.jsonl")], tmp_path / "o4", workers=1, text_field="content")
    with pytest.raises(ValueError, match="token id 70000 does not fit the uint16"):
        prep.to_uint16([1, 70000])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        prep.main(["nothing/*.jsonl", f"--out_dir={tmp_path}"])

    def full_disk(path, tokens):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(prep, "write_shard", full_disk)
    with pytest.raises(SystemExit, match="disk full while writing wiki_val_000000.bin"):
        run([str(tmp_path / "a.jsonl")], tmp_path / "o5", workers=1, text_field="content", val_tokens=1)


def test_prep_bad_input_names_the_file_and_the_place(tmp_path):
    good = json.dumps({"text": "fine"}) + "\n"
    cases = {
        "bytes.jsonl": (good.encode() + b'{"text": "caf\xe9"}\n', r"bytes.jsonl: not UTF-8 text at byte 30"),
        "bytes.txt": (b"ok \xff\xfe", r"bytes.txt: not UTF-8 text at byte 3"),
        "cut.jsonl": ((good + '{"text": "cut sho').encode(), r"cut.jsonl: the line at byte 17 is not valid JSON"),
        "number.jsonl": ((good + '{"text": 5}\n').encode(), r"number.jsonl: document 1 of this part: the 'text' field "
                                                              r"holds int, not text"),
        "list.json": (b'[{"text": "a"}, {"text": ', r"list.json: not valid JSON"),
        "cut.jsonl.xz": (lzma.compress((good * 50).encode())[:-20], r"cut.jsonl.xz: cannot be decompressed"),
        "junk.jsonl.gz": (b"not gzip at all", r"junk.jsonl.gz: cannot be decompressed"),
        "cut.jsonl.gz": (gzip.compress(b'{"text": "a"}\n{"te'), r"""cut.jsonl.gz: the line starting '{"te' is not"""),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message):
            run([str(tmp_path / name)], tmp_path / ("o_" + name), workers=1, val_tokens=1)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"text": ["a", None, "b"]}), str(tmp_path / "none.parquet"))
    with pytest.raises(ValueError, match=r"none.parquet: row group 0, row 1: the 'text' field holds NoneType"):
        run([str(tmp_path / "none.parquet")], tmp_path / "o_parquet", workers=1, val_tokens=1)
    # the command line prints the message, not a traceback
    p = subprocess.run([sys.executable, "data/prepare.py", str(tmp_path / "cut.jsonl"), f"--out_dir={tmp_path / 'cli'}",
                        "--workers=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "prepare: " in p.stderr and "cut.jsonl" in p.stderr


class _FlakyFile:
    """A local file whose reads fail at random, as a hub connection does (resets, timeouts, 429s)."""

    def __init__(self, f, fs):
        self.f, self.fs = f, fs

    def read(self, *args):
        if self.fs.rng.random() < self.fs.fail:
            self.fs.failures += 1
            raise ConnectionError("injected fault: connection reset by peer")
        return self.f.read(*args)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def flaky_filesystem(fail, seed=0):
    """An fsspec filesystem, flaky://<absolute path>, over local files, whose reads fail with probability fail."""
    from fsspec.implementations.local import LocalFileSystem

    class FlakyFileSystem(LocalFileSystem):
        protocol = "flaky"
        rng, failures = np.random.default_rng(seed), 0

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).removeprefix("flaky://"))

        def _open(self, path, mode="rb", **kw):
            return _FlakyFile(super()._open(path, mode, **kw), type(self))

    FlakyFileSystem.fail = fail
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    return FlakyFileSystem


def write_parquets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(1)
    words = ["tensor", "product", "attention", "is", "all", "you", "need", "the", "cache", "rank"]
    paths = []
    for i in range(3):
        docs = [" ".join(rng.choice(words, rng.integers(5, 60))) for _ in range(40)]
        path = str(tmp_path / f"part_{i}.parquet")
        pq.write_table(pa.table({"text": docs}), path, row_group_size=7)  # 6 row groups each
        paths.append(path)
    return paths


def test_hub_reads_retry_transient_errors_and_give_identical_shards(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    monkeypatch.setattr(prep, "BACKOFF_S", 0.0)  # no real waiting in a test
    paths = write_parquets(tmp_path)
    clean = run(paths, tmp_path / "clean", workers=2, val_tokens=500, shard_size=1500)
    fs = flaky_filesystem(fail=0.3)
    flaky = run([f"flaky://{p}" for p in paths], tmp_path / "flaky", workers=0, val_tokens=500, shard_size=1500)
    assert fs.failures >= 5  # reads failed and were retried
    assert flaky["tokens"] == clean["tokens"] and len(clean["shards"]) >= 4
    for shard in clean["shards"]:
        assert open(tmp_path / "clean" / shard["name"], "rb").read() == \
            open(tmp_path / "flaky" / shard["name"], "rb").read()
    flaky_filesystem(fail=1.0)  # a connection that never comes back: a clear error after the retries
    with pytest.raises(ValueError, match=r"part_0.parquet: still failing after 8 retries .*HF_TOKEN"):
        run([f"flaky://{paths[0]}"], tmp_path / "down", workers=0, val_tokens=500)


def test_which_read_errors_are_retried():
    class HTTPError(OSError):
        def __init__(self, status):
            self.response = type("R", (), {"status_code": status})()
    assert all(prep._transient(e) for e in (HTTPError(429), HTTPError(503), ConnectionError("reset"),
                                             TimeoutError("slow"), OSError("broken pipe")))
    assert not any(prep._transient(e) for e in (HTTPError(404), HTTPError(401), FileNotFoundError("x"),
                                                 ValueError("bad"), PermissionError("no")))
    calls, sleeps = [], []

    def read():
        calls.append(1)
        if len(calls) < 3:
            raise HTTPError(503)
        return "ok"
    assert prep.with_retries(read, "x", sleep=sleeps.append) == "ok" and len(calls) == 3
    assert 0.5 <= sleeps[0] <= 1.5 and 1.0 <= sleeps[1] <= 3.0  # exponential backoff with jitter
    with pytest.raises(FileNotFoundError):  # not retried
        prep.with_retries(lambda: open("/nonexistent/file"), "x", sleep=sleeps.append)
    assert len(sleeps) == 2


def test_tokenizer_too_large(tmp_path, monkeypatch):
    class Big:
        n_vocab = 100_277
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: Big())
    with pytest.raises(ValueError, match="100277 tokens; the uint16 shard format"):
        run(["x.jsonl"], tmp_path, workers=1)


# -- shards and the loader ---------------------------------------------------------------------------


def make_shards(root, sizes, split="train", start=0):
    """Shards whose tokens are consecutive integers (mod 65536), so every window is identifiable."""
    os.makedirs(root, exist_ok=True)
    for i, n in enumerate(sizes):
        write_shard(os.path.join(root, f"t_{split}_{i:06d}.bin"), (np.arange(start, start + n) % 65536).astype(np.uint16))
        start += n
    return str(root)


def test_corrupt_shards_are_refused(tmp_path):
    good = make_shards(tmp_path, [100])
    path = os.path.join(good, "t_train_000000.bin")
    assert read_header(path) == 100
    raw = bytearray(open(path, "rb").read())
    cases = {
        "magic": (bytes(4) + raw[4:], "bad magic number 0"),
        "truncated": (raw[:-10], "header says 100 tokens .* but the file has"),
        "count": (raw[:8] + np.int32(99).tobytes() + raw[12:], "header says 99 tokens"),
        "short": (raw[:100], "shorter than the 1024-byte shard header"),
        "version": (raw[:4] + np.int32(7).tobytes() + raw[8:], "unsupported shard version 7"),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"bad_{name}"
        os.makedirs(bad)
        (bad / "t_train_000000.bin").write_bytes(bytes(content))
        with pytest.raises(ValueError, match=message):
            TrainLoader(str(bad), 2, 8)
        with pytest.raises(ValueError, match=f"bad_{name}/t_train_000000.bin"):
            prep.check(str(bad), progress=False)
    with pytest.raises(FileNotFoundError, match="no \\*_train_NNNNNN.bin shards"):
        TrainLoader(str(tmp_path / "nowhere"), 2, 8)


def first_tokens(x):
    return sorted(x[:, 0].tolist())


def test_loader_epoch_coverage_and_ranks(tmp_path):
    T, sizes = 8, [8 * 10 + 1, 8 * 7 + 5, 8 * 13 + 1]  # 10 + 7 + 13 = 30 windows
    root = make_shards(tmp_path, sizes)
    single = TrainLoader(root, 3, T, seed=5)
    assert single.windows_per_epoch == 30
    seen = []
    for _ in range(10):  # one epoch: 10 micro-steps of 3
        x, y = single.next_batch()
        assert x.shape == (3, T) and torch.equal(x[:, 1:], y[:, :-1])
        assert ((y - x) % 65536 == 1).all()  # consecutive tokens: a window inside one shard
        seen += x[:, 0].tolist()
    assert len(set(seen)) == 30  # every window once, no repeat
    epoch2 = sum((first_tokens(single.next_batch()[0]) for _ in range(10)), [])
    assert sorted(epoch2) == sorted(seen) and epoch2 != seen  # next epoch: same windows, new order
    # two ranks of batch 3 cover the samples of one rank of batch 6, disjointly, step for step
    one = TrainLoader(root, 6, T, seed=5)
    r0, r1 = TrainLoader(root, 3, T, 0, 2, seed=5), TrainLoader(root, 3, T, 1, 2, seed=5)
    for _ in range(12):
        a, b = r0.next_batch()[0], r1.next_batch()[0]
        assert not set(a[:, 0].tolist()) & set(b[:, 0].tolist())
        assert first_tokens(torch.cat([a, b])) == first_tokens(one.next_batch()[0])
    # and a batch of 6 is two micro-batches of 3 on one rank (gradient accumulation)
    acc, one = TrainLoader(root, 3, T, seed=9), TrainLoader(root, 6, T, seed=9)
    for _ in range(5):
        assert torch.equal(torch.cat([acc.next_batch()[0], acc.next_batch()[0]]), one.next_batch()[0])


def test_loader_resume(tmp_path):
    root = make_shards(tmp_path, [8 * 20 + 1, 8 * 9 + 1])
    ref = TrainLoader(root, 4, 8, seed=3)
    for _ in range(11):
        ref.next_batch()
    state = ref.state_dict()
    expected = [ref.next_batch()[0] for _ in range(6)]
    resumed = TrainLoader(root, 4, 8, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # it survives a JSON round trip
    assert all(torch.equal(resumed.next_batch()[0], e) for e in expected)
    # the same global position on 2 ranks of batch 2
    r0, r1 = TrainLoader(root, 2, 8, 0, 2), TrainLoader(root, 2, 8, 1, 2)
    r0.load_state_dict(state)
    r1.load_state_dict(state)
    assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), expected[0])
    with pytest.raises(ValueError, match="whole number of micro-steps"):
        TrainLoader(root, 3, 8).load_state_dict(state)


def test_val_set_is_fixed(tmp_path):
    root = make_shards(tmp_path, [500, 300], split="val")
    make_shards(tmp_path, [100], split="train")
    vs = ValSet(root, 16, 650)
    assert vs.n_windows == (650 - 1) // 16 and vs.n_tokens == 40 * 16
    ref = torch.cat([x for x, _ in vs.batches(7)])
    assert torch.equal(ref[:, 0], torch.arange(0, 40 * 16, 16))  # the first tokens of the val split, in order
    for bs, world in ((1, 1), (5, 2), (40, 3), (64, 4)):
        parts = [torch.cat([x for x, _ in vs.batches(bs, r, world)]) for r in range(world)
                 if list(vs.batches(bs, r, world))]
        assert torch.equal(torch.cat(parts), ref)
    with pytest.raises(ValueError, match="fewer than one window"):
        ValSet(root, 1000, 1000)


def test_shard_header_layout(tmp_path):
    path = str(tmp_path / "x_val_000000.bin")
    write_shard(path, np.array([1, 2, 65535], dtype=np.uint16))
    raw = open(path, "rb").read()
    assert np.frombuffer(raw[:12], "<i4").tolist() == [20240520, 1, 3] and len(raw) == HEADER_BYTES + 6
    assert np.frombuffer(raw[HEADER_BYTES:], "<u2").tolist() == [1, 2, 65535]
    assert not os.path.exists(path + ".tmp")


def test_batches_land_on_the_requested_device(tmp_path):
    """Training and validation batches go to the run's device whatever its kind (not only CUDA): "meta" stands in
    for MPS here, where a batch left on the CPU would meet the model's weights on another device."""
    root = make_shards(tmp_path, [8 * 10 + 1])
    make_shards(tmp_path, [100], split="val")
    x, y = TrainLoader(root, 3, 8, device="meta").next_batch()
    assert x.device.type == y.device.type == "meta" and x.shape == (3, 8)
    val = ValSet(root, 8, 40)
    assert all(x.device.type == "meta" for x, _ in val.batches(2, device="meta"))
    assert all(x.device.type == "cpu" for x, _ in val.batches(2))
