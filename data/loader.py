"""
The one data loader: token shards -> training batches and a fixed validation set.

Shards (data/shards.py, llm.c's format) are written by data/prepare.py as DIR/*_{val,train}_NNNNNN.bin.

Training order (TrainLoader). Each epoch is a permutation of every window of block_size + 1 tokens
(stride block_size, windows never cross a shard): the shards in a random order, and the windows of
each shard in a random order, both seeded by (seed, epoch). Sample i of the global order is the same
for any world size: micro-step s on rank r reads samples (s * world + r) * B ... + B - 1, so one
optimizer step of a global batch covers the same samples on 1 GPU or on 8, ranks are disjoint, and
there is no repeat within an epoch. The state is one global counter (state_dict / load_state_dict).

Validation (ValSet): the first N tokens of the val split cut into windows of block_size + 1
(stride block_size): the same tokens for any batch size or world size.
"""

import numpy as np
import torch

from data.shards import check_ids, find_shards, open_shard, read_header


class TrainLoader:
    """Batches (x, y) of shape (B, T) without replacement within an epoch; see the module docstring."""

    def __init__(self, data_dir, batch_size, block_size, rank=0, world_size=1, seed=1337, device="cpu", vocab_size=None):
        self.paths = find_shards(data_dir, "train")
        self.B, self.T, self.rank, self.world_size, self.seed = batch_size, block_size, rank, world_size, seed
        self.device, self.vocab_size = device, vocab_size  # with vocab_size, each shard's ids are checked when opened
        self.windows = np.array([(read_header(p) - 1) // block_size for p in self.paths], dtype=np.int64)
        self.windows_per_epoch = int(self.windows.sum())
        if self.windows_per_epoch < batch_size * world_size:
            raise ValueError(f"{data_dir}: the train split has {self.windows_per_epoch} windows of {block_size + 1} "
                             f"tokens, fewer than one micro-step needs ({batch_size} x {world_size} ranks)")
        self.step = 0  # global micro-step counter: the whole state
        self._epoch = self._shard = None

    def state_dict(self):
        return dict(step=self.step, seed=self.seed, batch_size=self.B * self.world_size, block_size=self.T)

    def load_state_dict(self, state):
        if state["block_size"] != self.T:
            raise ValueError(f"loader state is for block_size={state['block_size']}, this run has {self.T}")
        samples = state["step"] * state["batch_size"]
        if samples % (self.B * self.world_size):
            raise ValueError(f"cannot resume: {samples} samples consumed is not a whole number of micro-steps of "
                             f"{self.B} x {self.world_size} ranks; keep batch_size x world_size = {state['batch_size']}")
        self.step, self.seed = samples // (self.B * self.world_size), state["seed"]

    def _epoch_order(self, epoch):
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(len(self.paths))
            self._ends = np.cumsum(self.windows[self._order])
            self._epoch = epoch
        return self._order, self._ends

    def _window(self, i):
        """Global sample index -> (path index, window start token)."""
        epoch, j = divmod(i, self.windows_per_epoch)
        order, ends = self._epoch_order(epoch)
        k = int(np.searchsorted(ends, j, side="right"))
        shard = int(order[k])
        if self._shard != (epoch, shard):  # one memmap open at a time
            self._tokens = open_shard(self.paths[shard], self.vocab_size)
            self._perm = np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.windows[shard]))
            self._shard = (epoch, shard)
        local = j - (int(ends[k - 1]) if k else 0)
        return int(self._perm[local]) * self.T

    def next_batch(self):
        first = (self.step * self.world_size + self.rank) * self.B
        rows = []
        for i in range(first, first + self.B):  # a batch may straddle two shards
            start = self._window(i)
            rows.append(np.asarray(self._tokens[start:start + self.T + 1], dtype=np.int64))
        self.step += 1
        return self._to_device(np.stack(rows))

    def _to_device(self, buf):
        t = torch.from_numpy(buf)
        if torch.device(self.device).type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        else:  # the CPU (a no-op), or another device (mps)
            t = t.to(self.device)
        return t[:, :-1], t[:, 1:]


class ValSet:
    """The fixed validation set: the first `tokens` tokens of the val split in windows of block_size + 1."""

    def __init__(self, data_dir, block_size, tokens, vocab_size=None):
        paths = find_shards(data_dir, "val")
        chunks, have = [], 0
        for p in paths:
            if have >= tokens:
                break
            shard = open_shard(p)
            chunks.append(np.asarray(shard[:tokens - have], dtype=np.uint16))
            have += len(chunks[-1])
            if vocab_size is not None:
                check_ids(p, chunks[-1], vocab_size)
        data = np.concatenate(chunks)
        self.n_windows = (len(data) - 1) // block_size
        if self.n_windows < 1:
            raise ValueError(f"{data_dir}: the val split has {len(data)} tokens, fewer than one window of {block_size + 1}")
        self.T = block_size
        self.data = data[:self.n_windows * block_size + 1]

    @property
    def n_tokens(self):
        return self.n_windows * self.T

    def batches(self, batch_size, rank=0, world_size=1, device="cpu"):
        """This rank's share of the windows (contiguous), as (x, y) batches of at most batch_size."""
        per_rank = -(-self.n_windows // world_size)
        lo, hi = rank * per_rank, min(self.n_windows, (rank + 1) * per_rank)
        for s in range(lo, hi, batch_size):
            idx = np.arange(s, min(hi, s + batch_size))[:, None] * self.T + np.arange(self.T + 1)
            t = torch.from_numpy(self.data[idx].astype(np.int64))
            if torch.device(device).type == "cuda":
                t = t.pin_memory().to(device, non_blocking=True)
            else:
                t = t.to(device)
            yield t[:, :-1], t[:, 1:]
