"""
llm.c token shards: a header of 256 int32 (magic 20240520, version 1, token count, then zeros)
followed by the tokens as little-endian uint16. Numpy only, so that data/prepare.py's workers stay light.
"""

import glob
import os

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


def find_shards(data_dir, split):
    """The split's shard paths in order; FileNotFoundError (saying how to make them) if there are none."""
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin")))
    if not paths:
        raise FileNotFoundError(f"no *_{split}_NNNNNN.bin shards in {data_dir!r}; prepare data first, "
                                f"e.g. python data/prepare.py shakespeare --out_dir={data_dir}")
    return paths


def write_shard(path, tokens):
    """Write uint16 tokens to path atomically (temporary file, then rename)."""
    tokens = np.asarray(tokens)
    assert tokens.dtype == np.uint16
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(tokens))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path):
    """Validate a shard's header against its size; return its token count. Errors name the file."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header (truncated file?)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: bad magic number {header[0]} (expected {MAGIC}); not a token shard from data/prepare.py")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    if size != HEADER_BYTES + 2 * count:
        raise ValueError(f"{path}: header says {count} tokens ({HEADER_BYTES + 2 * count} bytes) but the file has "
                         f"{size} bytes (truncated or corrupt; prepare it again)")
    return count


class TokenIdError(ValueError):
    """A shard holds a token id outside the model's vocabulary."""


def check_ids(path, tokens, vocab_size):
    """A TokenIdError naming the file if a token id of tokens (from path) is not below vocab_size."""
    top = int(tokens.max()) if len(tokens) else 0
    if top >= vocab_size:
        raise TokenIdError(f"{path}: token id {top} is outside the model's vocabulary of {vocab_size} ids (a shard of "
                         f"another tokenizer, a corrupt shard, or a vocab_size too small for this data)")


def open_shard(path, vocab_size=None):
    """Memory-map a shard's tokens (uint16), after validating its header, and with vocab_size, its token ids
    (one pass over the file: a max over a memmap reads it at disk speed)."""
    count = read_header(path)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None:
        check_ids(path, tokens, vocab_size)
    return tokens
