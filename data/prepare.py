"""
Token shards from FineWeb-Edu, tiny Shakespeare or local files; and a checker for them.

    python data/prepare.py fineweb-edu --version=10B                # -> data/fineweb-edu-10B
    python data/prepare.py fineweb-edu --version=100B --workers=32  # the paper's data
    python data/prepare.py fineweb-edu --version=100B --max_tokens=10_000_000_000   # a 10B prefix
    python data/prepare.py shakespeare                              # quick start (downloads 1 MB)
    python data/prepare.py shakespeare --input=path/to/input.txt    # the same, offline
    python data/prepare.py 'corpus/*.jsonl.zst' more.parquet --out_dir=data/mine --text_field=content
    python data/prepare.py check data/fineweb-edu-10B               # validate every shard, print totals

Every source becomes a list of work units (a parquet row group, a byte range of a JSON-lines file, a
whole text file, or a decompressed block of a compressed file), read and tokenized by a pool of
workers and written in unit order, so the shards do not depend on the number of workers. Each
document is prefixed with the GPT-2 end-of-text token (docs/DESIGN.md sec. 5) and documents run across shard
boundaries. The first --val_tokens tokens are the val split (*_val_NNNNNN.bin), the rest train.

Memory stays bounded (at most 2 x workers units in flight and one shard buffer), whatever the size of
the source; FineWeb-Edu row groups are streamed from the hub and never stored. After every shard the
position in the unit list is saved, so an interrupted run (Ctrl-C, kill, crash) resumes after its last
complete shard and writes byte-identical shards. Shards are written to a temporary name and renamed.
"""

import argparse
import bz2
import errno
import glob
import gzip
import json
import lzma
import multiprocessing as mp
import os
import random
import sys
import time
import urllib.request
from collections import deque

import numpy as np

if __package__ in (None, ""):  # run as `python data/prepare.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import HEADER_BYTES, open_shard, read_header, write_shard

FINEWEB = "HuggingFaceFW/fineweb-edu"
FINEWEB_VERSIONS = {"10B": 10e9, "100B": 100e9, "350B": 350e9}  # config sample-<v>T; nominal tokens
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CHUNK_BYTES = 1 << 20  # JSON-lines work units: ~1 MB of text (small units keep many workers busy to the end;
# the shards do not depend on it, a resume state does: it is saved with the state and checked)
COMPRESSION = {".gz": gzip.open, ".xz": lzma.open, ".zst": None, ".bz2": bz2.open}
STATE, META = "prepare_state.json", "meta.json"
RETRIES, BACKOFF_S, BACKOFF_CAP_S = 8, 1.0, 60.0  # transient read errors: 1, 2, 4, ... 60 s (+ jitter), then give up


# -----------------------------------------------------------------------------
# sources -> work units


def _open_compressed(path):
    ext = os.path.splitext(path)[1]
    if ext == ".zst":
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    return COMPRESSION[ext](path, "rb")


def _kind(path):
    """(format, compressed) from the file name: format is parquet, jsonl, json or txt."""
    base, ext = os.path.splitext(path)
    compressed = ext in COMPRESSION
    if compressed:
        ext = os.path.splitext(base)[1]
    if ext == ".parquet":
        if compressed:
            raise ValueError(f"{path}: parquet files are compressed internally; decompress the outer file first")
        return "parquet", False
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}.get(ext, "txt"), compressed


def _line_ranges(path):
    """Byte ranges of about CHUNK_BYTES that start and end on line boundaries."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(start + CHUNK_BYTES, size))
            f.readline()
            end = min(f.tell(), size)
            yield start, end
            start = end


def _blocks(stream):
    """Blocks of about CHUNK_BYTES of whole lines from a (decompressed) binary stream."""
    rest = b""
    while True:
        data = stream.read(CHUNK_BYTES)
        if not data:
            if rest:
                yield rest
            return
        data = rest + data
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            rest = data
            continue
        rest = data[cut:]
        yield data[:cut]


def _transient(e):
    """A read error worth retrying: a reset, a timeout, HTTP 429 or 5xx; not a missing file or a refused access."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status is not None:
        return status == 429 or status >= 500
    return isinstance(e, (OSError, TimeoutError, ConnectionError, EOFError))


def with_retries(read, what, on_retry=None, sleep=time.sleep):
    """read() again after a transient error, with exponential backoff and jitter, up to RETRIES times; then a clear
    error naming what was read. on_retry() drops state that the failure may have broken (an open file)."""
    for attempt in range(RETRIES + 1):
        try:
            return read()
        except Exception as e:
            if not _transient(e):
                raise
            if attempt == RETRIES:
                raise ValueError(f"{what}: still failing after {RETRIES} retries ({type(e).__name__}: {e}); run the "
                                 f"same command again later to resume (HF_TOKEN raises the hub's rate limits)") from e
            if on_retry:
                on_retry()
            sleep(min(BACKOFF_CAP_S, BACKOFF_S * 2 ** attempt) * random.uniform(0.5, 1.5))


def units(files):
    """Work units of a list of files or URLs, in a fixed order."""
    for path in files:
        kind, compressed = _kind(path)
        if kind == "parquet":
            import fsspec
            import pyarrow.parquet as pq

            def row_groups():
                with fsspec.open(path, "rb") as f:
                    return pq.ParquetFile(f).num_row_groups
            for g in range(with_retries(row_groups, path)):
                yield ("parquet", path, g)
        elif not compressed and kind == "jsonl":
            for start, end in _line_ranges(path):
                yield ("lines", path, start, end)
        elif not compressed:
            yield ("file", path, kind)
        else:
            try:
                with _open_compressed(path) as stream:
                    if kind == "jsonl":
                        for block in _blocks(stream):
                            yield ("data", path, "jsonl", block)
                    else:  # a whole txt or JSON document list
                        yield ("data", path, kind, stream.read())
            except (OSError, EOFError, lzma.LZMAError) as e:  # corrupt or truncated; zstandard's error is an OSError
                raise ValueError(f"{path}: cannot be decompressed ({type(e).__name__}: {e}); is the file complete?") \
                    from None


def fineweb_files(version):
    """The parquet files of HuggingFaceFW/fineweb-edu sample-<version>T, as hf:// URLs (through datasets)."""
    import datasets
    builder = datasets.load_dataset_builder(FINEWEB, name=f"sample-{version}T")
    files = [str(f) for f in builder.config.data_files["train"]]
    if not files:
        raise ValueError(f"{FINEWEB} sample-{version}T lists no train files")
    return files


def local_files(patterns):
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        files += [m for m in matched if os.path.isfile(m)]
    return files


# -----------------------------------------------------------------------------
# workers: unit -> documents -> tokens

_ENC = None
_FIELD = None


def _init_worker(tokenizer, text_field):
    global _ENC, _FIELD
    import tiktoken
    if _ENC is None or _ENC.name != tokenizer:  # once per worker process
        _ENC = tiktoken.get_encoding(tokenizer)
    _FIELD = text_field


_PARQUET = [None, None, None]  # this worker's open parquet file: path, file object, ParquetFile


def _parquet_file(path):
    """The ParquetFile of path, kept open across units: a worker gets a file's row groups one after another,
    and reopening means parsing the footer again (an HTTP round trip or more for hub files)."""
    if _PARQUET[0] != path:
        import fsspec
        import pyarrow.parquet as pq
        _close_parquet_file()
        f = fsspec.open(path, "rb").open()
        _PARQUET[:] = [path, f, pq.ParquetFile(f)]
    return _PARQUET[2]


def _close_parquet_file():
    if _PARQUET[1] is not None:
        try:
            _PARQUET[1].close()
        except Exception:  # a connection that already failed
            pass
    _PARQUET[:] = [None, None, None]


def _texts_from_records(records, where):
    """records: [(where the record is, record)] -> its texts; errors say where."""
    texts = []
    for at, rec in records:
        if not isinstance(rec, dict) or _FIELD not in rec:
            keys = list(rec) if isinstance(rec, dict) else type(rec).__name__
            raise ValueError(f"{where}: {at} has no field {_FIELD!r} (it has {keys}); pass --text_field=NAME")
        texts.append(rec[_FIELD])
    return texts


def _json_lines(text, path, offset):
    """(where, record) of every non-empty line; offset: the text's first byte in the file (None: decompressed)."""
    records, pos = [], 0
    for line in text.split("\n"):
        if line.strip():
            at = f"the line at byte {offset + len(text[:pos].encode())}" if offset is not None else \
                f"the line starting {line[:40]!r}"
            try:
                records.append((at, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: {at} is not valid JSON ({e.msg} at column {e.colno}); a truncated or "
                                 f"damaged line?") from None
        pos += len(line) + 1
    return records


def _texts(unit):
    kind = unit[0]
    if kind == "parquet":
        _, path, group = unit

        def read():
            pf = _parquet_file(path)
            if _FIELD not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no column {_FIELD!r} (columns: {pf.schema_arrow.names}); "
                                 f"pass --text_field=NAME")
            return pf.read_row_group(group, columns=[_FIELD]).column(0).to_pylist()
        return with_retries(read, f"{path}, row group {group}", on_retry=_close_parquet_file)
    offset = 0  # the data's first byte in the file; None for decompressed data
    if kind == "lines":
        _, path, offset, end = unit
        with open(path, "rb") as f:
            f.seek(offset)
            data, fmt = f.read(end - offset), "jsonl"
    elif kind == "file":
        _, path, fmt = unit
        with open(path, "rb") as f:
            data = f.read()
    else:
        _, path, fmt, data = unit
        offset = None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = f"byte {offset + e.start}" if offset is not None else f"byte {e.start} of a decompressed block"
        raise ValueError(f"{path}: not UTF-8 text at {at} ({e.reason}); convert the file to UTF-8") from None
    if fmt == "txt":
        return [text]
    if fmt == "json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        return _texts_from_records([(f"record {i}", r) for i, r in enumerate(records)], path)
    return _texts_from_records(_json_lines(text, path, offset), path)


def to_uint16(ids, where=""):
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (ids.max() >= 2 ** 16 or ids.min() < 0):
        raise ValueError(f"{where}token id {ids.max()} does not fit the uint16 shard format (ids must be < 65536); "
                         f"use a tokenizer with a vocabulary of at most 65536")
    return ids.astype(np.uint16)


def tokenize_unit(unit):
    """One work unit -> uint16 tokens, each document prefixed with EOT."""
    eot = np.array([_ENC.eot_token])
    parts = []
    for i, text in enumerate(_texts(unit)):
        if not isinstance(text, str):
            where = f"row group {unit[2]}, row {i}" if unit[0] == "parquet" else f"document {i} of this part"
            raise ValueError(f"{unit[1]}: {where}: the {_FIELD!r} field holds {type(text).__name__}, not text")
        parts.append(eot)
        # = encode_ordinary (special-token strings are plain text), straight into numpy
        parts.append(_ENC.encode_to_numpy(text, disallowed_special=()))
    return to_uint16(np.concatenate(parts) if parts else [], f"{unit[1]}: ")


# -----------------------------------------------------------------------------
# writer: ordered tokens -> shards, with the resume state


class ShardWriter:
    def __init__(self, out_dir, prefix, shard_size, val_tokens, max_tokens, eot, state):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.val_tokens, self.max_tokens, self.eot = val_tokens, max_tokens, eot
        self.s = state
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0

    @staticmethod
    def new_state(val_tokens):
        return dict(unit=0, skip=0, split="val" if val_tokens > 0 else "train",
                    index=dict(val=0, train=0), tokens=dict(val=0, train=0), docs=dict(val=0, train=0), shards=[])

    @property
    def written(self):
        return self.s["tokens"]["val"] + self.s["tokens"]["train"] + self.fill

    def room(self):
        room = self.shard_size - self.fill
        if self.s["split"] == "val":
            room = min(room, self.val_tokens - self.s["tokens"]["val"] - self.fill)
        if self.max_tokens:
            room = min(room, self.max_tokens - self.written)
        return room

    def full(self):
        return bool(self.max_tokens) and self.written >= self.max_tokens

    def add(self, unit_index, tokens, skip=0):
        """Append a unit's tokens (from offset skip); returns the number of tokens taken."""
        pos = skip
        while pos < len(tokens) and not self.full():
            n = min(self.room(), len(tokens) - pos)
            self.buf[self.fill:self.fill + n] = tokens[pos:pos + n]
            self.fill += n
            pos += n
            if self.room() == 0:
                self.flush(unit_index, pos)
        return pos - skip

    def flush(self, next_unit, next_skip):
        if self.fill == 0:
            return
        s, split = self.s, self.s["split"]
        name = f"{self.prefix}_{split}_{s['index'][split]:06d}.bin"
        try:
            write_shard(os.path.join(self.out_dir, name), self.buf[:self.fill])
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise SystemExit(f"disk full while writing {name} in {self.out_dir}: free some space and run the same "
                                 f"command again; it resumes after the last complete shard") from e
            raise
        s["tokens"][split] += self.fill
        s["docs"][split] += int(np.count_nonzero(self.buf[:self.fill] == self.eot))
        s["shards"].append(dict(name=name, split=split, tokens=self.fill))
        s["index"][split] += 1
        if split == "val" and s["tokens"]["val"] >= self.val_tokens:
            s["split"] = "train"
        s["unit"], s["skip"] = next_unit, next_skip
        self.fill = 0
        save_json(os.path.join(self.out_dir, STATE), dict(self.s, args=self.args))


def save_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


class _InProcess:
    """workers=0: the pool's calls, run in this process (a debugger, or a filesystem registered here, reaches them)."""

    def __init__(self, tokenizer, text_field):
        _init_worker(tokenizer, text_field)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def apply_async(self, fn, args):
        result = fn(*args)
        return type("Done", (), {"get": staticmethod(lambda: result)})


def prepare(files, out_dir, prefix, source, tokenizer="gpt2", workers=None, shard_size=10 ** 8, val_tokens=None,
            max_tokens=0, text_field="text", overwrite=False, total_hint=None, progress=True):
    """Tokenize files into shards in out_dir; returns the meta dict. See the module docstring."""
    import tiktoken
    enc = tiktoken.get_encoding(tokenizer)
    if enc.n_vocab > 2 ** 16:
        raise ValueError(f"tokenizer {tokenizer!r} has {enc.n_vocab} tokens; the uint16 shard format holds ids < 65536")
    workers = os.cpu_count() if workers is None else workers
    val_tokens = shard_size if val_tokens is None else val_tokens
    args = dict(source=source, files=list(files), tokenizer=tokenizer, shard_size=shard_size, val_tokens=val_tokens,
                max_tokens=max_tokens, text_field=text_field, chunk_bytes=CHUNK_BYTES)
    os.makedirs(out_dir, exist_ok=True)
    state = _start_state(out_dir, args, overwrite, val_tokens)
    if state is None:
        return load_json(os.path.join(out_dir, META))
    writer = ShardWriter(out_dir, prefix, shard_size, val_tokens, max_tokens, enc.eot_token, state)
    writer.args = args
    resume_unit, resume_skip = state["unit"], state["skip"]
    if resume_unit or resume_skip:
        print(f"resuming {out_dir} after {len(state['shards'])} complete shards ({writer.written:,} tokens)")

    from tqdm import tqdm
    bar = tqdm(total=max_tokens or total_hint, initial=writer.written, unit="tok", unit_scale=True,
               disable=not progress, smoothing=0.05, desc=f"{prefix} -> {out_dir}")
    # workers never fork this process: it may hold threads (torch's, the tokenizer's) whose locks a forked child
    # inherits held (a test run hung that way); forkserver forks a clean single-threaded server instead
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    try:
        with (ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, text_field)) if workers
              else _InProcess(tokenizer, text_field)) as pool:
            pending = deque()

            def drain_one():
                u, result = pending.popleft()
                tokens = result.get()
                bar.update(writer.add(u, tokens, skip=resume_skip if u == resume_unit else 0))

            for u, unit in enumerate(units(files)):
                if u < resume_unit:
                    continue  # already in complete shards
                pending.append((u, pool.apply_async(tokenize_unit, (unit,))))
                while len(pending) >= max(1, 2 * workers):
                    drain_one()
                if writer.full():
                    break
            while pending and not writer.full():
                drain_one()
    except KeyboardInterrupt:
        bar.close()
        raise SystemExit(f"\ninterrupted: {len(state['shards'])} complete shards are kept in {out_dir}; "
                         f"run the same command again to resume")
    bar.close()
    writer.flush(None, 0)
    if writer.written == 0:
        raise ValueError(f"the source produced no documents ({source}); check the files and --text_field")
    if state["tokens"]["train"] == 0:
        raise ValueError(f"all {writer.written:,} tokens of {source} went to the val split (--val_tokens={val_tokens:,}); "
                         f"run again with a smaller --val_tokens and --overwrite")
    meta = dict(source=source, tokenizer=tokenizer, vocab_size=enc.n_vocab, eot_token=enc.eot_token, dtype="uint16",
                header_bytes=HEADER_BYTES, shard_size=shard_size, val_tokens=val_tokens, max_tokens=max_tokens,
                text_field=text_field, files=list(files), documents=state["docs"], tokens=state["tokens"],
                shards=state["shards"])
    save_json(os.path.join(out_dir, META), meta)
    os.remove(os.path.join(out_dir, STATE))
    return meta


def load_json(path):
    with open(path) as f:
        return json.load(f)


def _start_state(out_dir, args, overwrite, val_tokens):
    """The state to start from, or None when out_dir already holds this exact finished run."""
    for tmp in glob.glob(os.path.join(out_dir, "*.tmp")):
        os.remove(tmp)  # a shard or state file that a killed run did not finish
    meta_path, state_path = os.path.join(out_dir, META), os.path.join(out_dir, STATE)
    existing = glob.glob(os.path.join(out_dir, "*_val_*.bin")) + glob.glob(os.path.join(out_dir, "*_train_*.bin"))
    if overwrite:
        for path in existing + [p for p in (meta_path, state_path) if os.path.exists(p)]:
            os.remove(path)
        return ShardWriter.new_state(val_tokens)
    if os.path.exists(meta_path):
        meta = load_json(meta_path)
        same = all(meta.get(k) == args[k] for k in ("source", "files", "tokenizer", "shard_size", "val_tokens",
                                                     "max_tokens", "text_field"))
        if same:
            print(f"{out_dir} is already prepared with these settings ({sum(meta['tokens'].values()):,} tokens)")
            return None
        raise SystemExit(f"{out_dir} already holds shards prepared with other settings; use another --out_dir "
                         f"or --overwrite to replace them")
    if os.path.exists(state_path):
        state = load_json(state_path)
        if state.pop("args") != args:
            raise SystemExit(f"{out_dir} holds an unfinished run with other settings; rerun it with the same "
                             f"settings to resume, or use --overwrite to start again")
        return state
    if existing:
        raise SystemExit(f"{out_dir} already holds shards that this tool did not record; use another --out_dir "
                         f"or --overwrite")
    return ShardWriter.new_state(val_tokens)


# -----------------------------------------------------------------------------
# check


def check(data_dir, progress=True):
    """Validate every shard (header, size, token range) and meta.json; return the totals per split."""
    from tqdm import tqdm
    meta_path = os.path.join(data_dir, META)
    meta = load_json(meta_path) if os.path.exists(meta_path) else None
    vocab = meta["vocab_size"] if meta else 50257
    paths = sorted(glob.glob(os.path.join(data_dir, "*_val_*.bin")) + glob.glob(os.path.join(data_dir, "*_train_*.bin")))
    if not paths:
        raise ValueError(f"{data_dir}: no *_val_*.bin or *_train_*.bin shards")
    totals = {"val": [0, 0], "train": [0, 0]}  # shards, tokens
    for path in tqdm(paths, desc=f"check {data_dir}", disable=not progress):
        read_header(path)
        tokens = open_shard(path)
        for i in range(0, len(tokens), 1 << 26):
            hi = int(tokens[i:i + (1 << 26)].max())
            if hi >= vocab:
                raise ValueError(f"{path}: token id {hi} is out of range for vocab_size {vocab}")
        split = "val" if "_val_" in os.path.basename(path) else "train"
        totals[split][0] += 1
        totals[split][1] += len(tokens)
    if meta:
        listed = {s["name"]: s["tokens"] for s in meta["shards"]}
        found = {os.path.basename(p): read_header(p) for p in paths}
        if listed != found:
            missing, extra = sorted(set(listed) - set(found)), sorted(set(found) - set(listed))
            raise ValueError(f"{data_dir}: shards do not match meta.json (missing {missing}, unlisted {extra}, "
                             f"or token counts differ)")
    for split, (n, t) in totals.items():
        docs = f", {meta['documents'][split]:,} documents" if meta else ""
        print(f"{split:>5}: {n} shards, {t:,} tokens{docs}")
    print(f"ok: {len(paths)} shards, {sum(t for _, t in totals.values()):,} tokens, all ids < {vocab}")
    return {k: dict(shards=n, tokens=t) for k, (n, t) in totals.items()}


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="+", help="fineweb-edu | shakespeare | check DIR | local files or globs")
    parser.add_argument("--out_dir", help="output folder (default: data/<source>)")
    parser.add_argument("--version", default="10B", choices=list(FINEWEB_VERSIONS), help="FineWeb-Edu sample")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="tokenizer processes (0: tokenize in this process)")
    parser.add_argument("--shard_size", type=int, default=10 ** 8, help="tokens per shard")
    parser.add_argument("--val_tokens", type=int, default=None,
                        help="tokens in the val split (default: one shard, as in the paper; shakespeare: 32768)")
    parser.add_argument("--max_tokens", type=int, default=0, help="stop after this many tokens (0: the whole source)")
    parser.add_argument("--text_field", default="text", help="field or column holding the text (json/jsonl/parquet)")
    parser.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding")
    parser.add_argument("--input", help="shakespeare: a local copy of input.txt (otherwise it is downloaded)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in out_dir")
    args = parser.parse_args(argv)
    src = args.source
    if src[0] == "check":
        if len(src) != 2:
            parser.error("usage: python data/prepare.py check DIR")
        return check(src[1])
    kw = dict(tokenizer=args.tokenizer, workers=args.workers, shard_size=args.shard_size, val_tokens=args.val_tokens,
              max_tokens=args.max_tokens, text_field=args.text_field, overwrite=args.overwrite)
    if src == ["fineweb-edu"]:
        out_dir = args.out_dir or f"data/fineweb-edu-{args.version}"
        files = fineweb_files(args.version)
        print(f"{FINEWEB} sample-{args.version}T: {len(files)} parquet files, streamed")
        return prepare(files, out_dir, "fineweb_edu", f"{FINEWEB}/sample-{args.version}T",
                       total_hint=args.max_tokens or FINEWEB_VERSIONS[args.version], **kw)
    if src == ["shakespeare"]:
        out_dir = args.out_dir or "data/shakespeare"
        path = args.input
        if path is None:
            path = os.path.join(out_dir, "input.txt")
            if not os.path.exists(path):
                os.makedirs(out_dir, exist_ok=True)
                print(f"downloading {SHAKESPEARE_URL}")
                urllib.request.urlretrieve(SHAKESPEARE_URL, path + ".tmp")
                os.replace(path + ".tmp", path)
        kw["val_tokens"] = 32768 if args.val_tokens is None else args.val_tokens
        return prepare([os.path.abspath(path)], out_dir, "shakespeare", "tinyshakespeare", **kw)
    if not args.out_dir:
        parser.error("local sources need --out_dir")
    files = [os.path.abspath(f) for f in local_files(src)]
    return prepare(files, args.out_dir, "data", "local:" + ",".join(src), **kw)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names the file
        sys.exit(f"prepare: {e}")
