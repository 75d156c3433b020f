"""
Generation: the decode cache, sampling, and the decode steps that drive a GPT from model.py.

    from engine import generate, generate_stream, KVCache
    out = generate(model, idx, 100, top_k=50)                  # (B, T + 100)
    for tok in generate_stream(model, idx, 100): ...           # (B,) per step

    cache = KVCache(model, batch_size=1, max_len=2048)         # drive the model by hand
    logits = cache.prefill(idx)                                # (B, T, V): the prompts, in one pass
    logits = cache.step(tok)                                   # (B, V): one new token per row after them

The model knows only the cache's per-layer contract (model.Attention: write the new tokens' entries, read what
is cached; cache.begin / cache.layer / cache.advance around a forward). Everything else lives here: the cache's
bookkeeping, the eager, compiled, fused batch-1 and CUDA-graph decode steps, and the sliding window past
block_size. Cache layouts and bytes: docs/DESIGN.md sec. 3.

Shape legend: B batch, T new tokens, L max_len, M cache slots read (kv_len), V vocabulary.
"""

import functools

import torch

from tpa_kernels import linear_one_row, pick, write_rows
from tpa_kernels.dispatch import choice, overrides


# -----------------------------------------------------------------------------
# the cache


class KVCache:
    """Preallocated decode cache of one model: for every layer exactly what its mechanism caches (cache_spec),
    each (B, max_len, ...), and seqlens (B,), the number of positions cached for every row.

    Options: use_kernel (TPA: FlashTPA on CUDA, else its PyTorch reference; False: the reference; "triton": the
    kernel wherever Triton runs, CPU tensors with TRITON_INTERPRET=1) and mla_absorb (MLA: latent-space decoding;
    False materialises K and V).

    Bookkeeping, owned here: length is a host-side upper bound of seqlens, so that no step needs a device sync;
    kv_len is how many slots attention reads (length, or max_len under a CUDA graph, whose shapes are fixed);
    fresh marks a prefill into an empty cache (attention then needs only the new tokens); uniform marks rows of
    one length with kv_len = seqlens + T, where a one-token step needs no mask.
    """

    def __init__(self, model, batch_size, max_len, device=None, dtype=None, use_kernel=True, mla_absorb=True):
        p = model.lm_head.weight
        device, dtype = device or p.device, dtype or p.dtype
        self.model, self.B, self.max_len = model, batch_size, max_len
        # kernel choices: the model reads them from the dispatch, set (overrides) around every step driven here
        self.choices = dict(flashtpa="ref" if not use_kernel else "triton" if use_kernel == "triton" else None,
                            mla_absorb=mla_absorb)
        self.layers = [{name: torch.zeros(batch_size, max_len, *shape, device=device, dtype=dtype)
                        for name, shape in block.attn.cache_spec().items()} for block in model.transformer.h]
        self.seqlens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.reset()

    def nbytes(self):
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    # -- what a driver calls ----------------------------------------------------

    def reset(self):
        """Empty the cache (its tensors keep their stale values; nothing reads past seqlens)."""
        self.seqlens.zero_()
        self.length, self.kv_len, self.fresh, self.uniform = 0, self.max_len, False, False

    def prefill(self, idx, lens=None):
        """idx (B, T) prompts into the empty cache in one pass -> logits (B, T, V) of every position.
        lens (B,): ragged prompts, right-padded in idx; each row then continues after its own last token (the
        padding's entries sit beyond seqlens and are overwritten)."""
        B, T = idx.shape
        if self.length:
            raise ValueError("prefill needs an empty cache (reset() it); cache.step(tokens) adds tokens to a full one")
        self._check_room(B, T)
        self.fresh, self.kv_len, self.uniform = True, T, lens is None
        with overrides(**self.choices):
            logits, _ = self.model(idx, all_logits=True, cache=self)
        self.fresh, self.length = False, T
        if lens is not None:
            self.seqlens.copy_(torch.as_tensor(lens, device=self.seqlens.device, dtype=torch.long))
        return logits

    def step(self, tok, decode=None):
        """tok (B,) or (B, T) new tokens of every row -> (B, V) logits of the last one; the cache then holds them.
        decode: decode_step (the default), compiled_decode_step() or fused_decode_step."""
        tok = tok[:, None] if tok.dim() == 1 else tok
        self._check_room(*tok.shape)
        self.length += tok.size(1)
        self.kv_len = self.length  # an upper bound of every row's seqlens, known without a device sync
        with overrides(**self.choices):
            return (decode or decode_step)(tok, self)

    def seek(self, length):
        """Set every row's length to length (the entries below are taken as they are: benchmarks fill a cache with
        random values and decode from any context)."""
        self._check_room(self.B, 0, length)
        self.seqlens.fill_(length)
        self.length, self.kv_len, self.fresh, self.uniform = length, length, False, True

    def _check_room(self, B, T, length=None):
        length = self.length if length is None else length
        if B != self.B:
            raise ValueError(f"{B} rows of tokens for a cache of batch size {self.B}")
        if length + T > self.max_len:
            raise ValueError(f"{length} cached + {T} new tokens exceed the cache's max_len={self.max_len}")

    # -- what the model calls around a forward (model.GPT.forward) ----------------

    def begin(self, T):
        """Positions (B, T) of T new tokens per row, and the mask every layer uses."""
        device = self.seqlens.device
        self.T, self._key_rope = T, None
        self.pos = self.seqlens[:, None] + torch.arange(T, device=device)
        self.mask = None if self.uniform and T == 1 else \
            torch.arange(self.kv_len, device=device)[None, None, :] <= self.pos[:, :, None]  # (B, T, M)
        return self.pos

    def layer(self, i):
        return LayerCache(self, i)

    def advance(self):
        """After the forward: the T new tokens are cached."""
        self.seqlens += self.T

    @property
    def key_rope(self):
        """RoPE of the cache positions 0..kv_len-1 (for factors that are rotated when read)."""
        if self._key_rope is None:
            self._key_rope = self.model.rope(torch.arange(self.kv_len, device=self.seqlens.device))
        return self._key_rope


class LayerCache:
    """One layer's view of a KVCache during a forward (made by KVCache.layer after begin): what a mechanism reads
    (model.Attention) and the tensors it writes and reads."""

    def __init__(self, cache, i):
        self.cache, self.tensors = cache, cache.layers[i]
        self.B, self.T = cache.B, cache.T  # rows, new tokens per row
        self.seqlens, self.mask = cache.seqlens, cache.mask  # (B,) cached before this forward; (B, T, kv_len) or None
        self.kv_len, self.fresh = cache.kv_len, cache.fresh  # slots attention reads; a prefill into an empty cache

    @property
    def key_rope(self):
        """RoPE of the cache positions 0..kv_len-1, built once per forward (KVCache.key_rope)."""
        return self.cache.key_rope

    def write(self, **new):
        """new: name -> (B|1, T, ...) entries of the new tokens, stored at their positions (on CUDA all of a
        layer's tensors in one kernel launch: tpa_kernels/cache_write.py)."""
        c = self.cache
        write_rows([self.tensors[name] for name in new], [t.expand(c.B, c.T, *t.shape[2:]) for t in new.values()], c.pos)

    def read(self, name):
        return self.tensors[name][:, :self.cache.kv_len]


# -----------------------------------------------------------------------------
# sampling


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) tokens. temperature 0 or top_k 1: greedy; top_p: nucleus sampling."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


# -----------------------------------------------------------------------------
# decode steps: (tok (B, T), cache) -> (B, V) logits of the last new token, the cache updated


def decode_step(tok, cache):
    """The model's forward with the cache (any mechanism, any batch)."""
    return cache.model(tok, cache=cache)[0][:, -1]


@functools.cache
def compiled_decode_step():
    """decode_step through torch.compile, built once (dynamic shapes: any batch size and cache length; dynamo
    specialises on the model, as it would on a method of it)."""
    return torch.compile(decode_step, dynamic=True)


def fused_decode_ok(cache):
    """Whether fused_decode_step serves this cache: batch 1, the kernels allowed, and every layer's attention able to
    (model.Attention.supports_fused: T6 and TPA-KVonly without gate, KV shift, constant or shared factors, third
    order)."""
    return (cache.B == 1 and cache.choices["flashtpa"] != "ref"
            and all(b.attn.supports_fused for b in cache.model.transformer.h))


def fused_decode_step(tok, cache):
    """decode_step for batch-1 T6 (and TPA-KVonly) as a chain of fused kernels, 6 per layer (the compiled step
    runs ~12): each block's fused_decode (model.Block), then RMSNorm + the output head. On a GPU of compute
    capability >= 9 every kernel uses programmatic dependent launch: it starts while the previous one finishes and
    loads its weights (or first cache block) before waiting for it. Off CUDA the same arithmetic runs through the
    kernels' PyTorch references. tok (1, 1) -> (1, V)."""
    if not fused_decode_ok(cache) or tok.shape != (1, 1):
        raise ValueError("fused_decode_step serves batch-1 T6 / TPA-KVonly models (see fused_decode_ok), one token "
                         "per step")
    model = cache.model
    impl = choice("flashtpa") or pick(tok)  # "triton" where the tests force it, else the dispatch
    pos = cache.seqlens  # (1,) the new token's position
    seqlens = pos + 1  # computed before the chain: FlashTPA reads it before waiting for the previous kernel
    rope = model.rope_buffers(model.config.head_dim)
    x = model.transformer.wte(tok).view(-1)  # (C,) the residual stream
    for block, layer in zip(model.transformer.h, cache.layers):
        x = block.fused_decode(x, layer, pos, seqlens, rope, impl)
    logits = linear_one_row(x, model.lm_head.weight, norm=True, impl=impl, pdl=True)
    cache.seqlens.copy_(seqlens)
    return logits.view(1, -1)


def cuda_graph_step(cache, decode=None):
    """Capture one decode step (decode_step by default) over the whole cache (kv_len = max_len, the fixed shapes a
    graph needs) in a CUDA graph -> step(tok (B,)) -> (B, V) logits, which replays it (batch-1 decoding is then not
    bound by kernel launches). The returned logits tensor is reused by the next replay."""
    decode = decode or decode_step
    if not torch.cuda.is_available() or cache.seqlens.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and the cache on a CUDA device")
    cache.kv_len, cache.uniform = cache.max_len, False
    static_tok = torch.zeros(cache.B, 1, dtype=torch.long, device=cache.seqlens.device)
    saved = cache.seqlens.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), overrides(**cache.choices):  # warm up (compiles the Triton kernels); the writes
        for _ in range(3):  # are overwritten later
            decode(static_tok, cache)
            cache.seqlens.copy_(saved)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), overrides(**cache.choices):  # the graph keeps the kernels chosen here
        static_logits = decode(static_tok, cache)
    cache.seqlens.copy_(saved)  # capturing does not run the step

    def step(tok):
        if cache.length + 1 > cache.max_len:
            raise ValueError(f"the cache's max_len={cache.max_len} is reached")
        static_tok.copy_(tok[:, None])
        graph.replay()
        cache.length += 1
        return static_logits
    return step


# -----------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, **kwargs):
    """nanoGPT's generate: idx (B, T) -> (B, T + max_new_tokens). top_k=1 (or temperature=0) is greedy.

    Keyword options are those of generate_stream (prompt_lens for a ragged batch, stop_tokens,
    use_cache, use_kernel, cuda_graph, compile, fused, generator). With prompt_lens or stop_tokens it returns
    a list of 1-D tensors (prompt + generated tokens, up to and including a stop token) instead.
    """
    steps = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, **kwargs))
    new = torch.stack(steps, dim=1) if steps else idx.new_zeros(idx.size(0), 0)
    prompt_lens, stop = kwargs.get("prompt_lens"), kwargs.get("stop_tokens")
    if prompt_lens is None and not stop:
        return torch.cat([idx, new], dim=1)
    lens = [idx.size(1)] * idx.size(0) if prompt_lens is None else [int(n) for n in prompt_lens]
    out = []
    for b, n in enumerate(lens):
        gen = new[b].tolist()
        for i, t in enumerate(gen):
            if stop and t in stop:
                gen = gen[:i + 1]
                break
        out.append(torch.cat([idx[b, :n], torch.tensor(gen, dtype=idx.dtype, device=idx.device)]))
    return out


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, prompt_lens=None,
                    stop_tokens=None, **kwargs):
    """Yield the next token of every sequence, (B,), max_new_tokens times (fewer if all stop).

    idx (B, T): prompts, right-padded when prompt_lens (B,) gives their lengths. use_cache=False
    recomputes the whole sequence at every step (the reference). use_kernel: FlashTPA on CUDA for TPA.
    cuda_graph: capture the decode step in a CUDA graph (CUDA only; batch-1 decoding is then not
    bound by kernel launches). compile: torch.compile the decode step (fuses its elementwise work;
    with cuda_graph the compiled step is what is captured). fused: batch-1 T6 decodes through
    fused_decode_step (None: on CUDA, where it is faster; True: wherever it applies; False: never); it needs no
    compile, and with cuda_graph it is what is captured.

    Past block_size the context slides, as nanoGPT's crop does, in jumps: when the sequence fills block_size,
    its last 3/4 block_size tokens are prefilled again at positions 0.. and generation goes on from them (a
    longer prompt keeps its last 3/4 block_size). Each token is then exactly what a full forward over the
    context since the last jump gives: cached and recomputed (use_cache=False) generation agree.
    """
    B, T = idx.shape
    L = model.config.block_size
    if T + max_new_tokens <= L:
        yield from _generate_window(model, idx, max_new_tokens, temperature, top_k, top_p, prompt_lens, stop_tokens,
                                    **kwargs)
        return
    if prompt_lens is not None:
        raise ValueError(f"ragged prompts (prompt_lens) plus max_new_tokens must fit the model's block_size={L} "
                         f"(got {T} + {max_new_tokens})")
    keep = max(1, 3 * L // 4)
    ctx = idx if T < L else idx[:, -keep:]
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    stop = None if not stop_tokens else torch.as_tensor(sorted(stop_tokens), device=idx.device)
    left = max_new_tokens
    while left > 0:
        n = min(left, L - ctx.size(1))
        new = []
        for tok in _generate_window(model, ctx, n, temperature, top_k, top_p, None, None, **kwargs):
            yield tok
            new.append(tok)
            if stop is not None:
                done |= torch.isin(tok, stop)
                if done.all():
                    return
        left -= n
        ctx = torch.cat([ctx, torch.stack(new, dim=1)], dim=1)[:, -keep:]  # (B, keep) the slid context


def _generate_window(model, idx, max_new_tokens, temperature, top_k, top_p, prompt_lens, stop_tokens, use_cache=True,
                     use_kernel=True, cuda_graph=False, compile=False, fused=None, generator=None):
    """generate_stream within block_size."""
    B, T = idx.shape
    lens = torch.full((B,), T, device=idx.device) if prompt_lens is None else \
        torch.as_tensor(prompt_lens, device=idx.device, dtype=torch.long)
    total = int(T + max_new_tokens)
    if total > model.config.block_size:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} tokens is more than this "
                         f"model's block_size={model.config.block_size} (its RoPE tables and cache size)")
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    stop = None if not stop_tokens else torch.as_tensor(sorted(stop_tokens), device=idx.device)
    if not use_cache:  # recompute everything; right-padding never reaches a valid token (causal)
        seq = torch.cat([idx, idx.new_zeros(B, max_new_tokens)], dim=1)
        for step in range(max_new_tokens):
            logits, _ = model(seq[:, :T + step], all_logits=True)
            tok = sample_logits(logits[torch.arange(B), lens + step - 1], temperature, top_k, top_p, generator)
            seq[torch.arange(B), lens + step] = tok
            yield tok
            if stop is not None:
                done |= torch.isin(tok, stop)
                if done.all():
                    return
        return
    cache = KVCache(model, B, total, use_kernel=use_kernel)
    logits = cache.prefill(idx, None if prompt_lens is None else lens)
    next_logits = logits[torch.arange(B), lens - 1]
    decode = compiled_decode_step() if compile else decode_step
    if (fused or (fused is None and idx.is_cuda)) and fused_decode_ok(cache):
        decode = fused_decode_step
    step_fn = cuda_graph_step(cache, decode) if cuda_graph else (lambda tok: cache.step(tok, decode))
    for step in range(max_new_tokens):
        tok = sample_logits(next_logits, temperature, top_k, top_p, generator)
        yield tok
        if stop is not None:
            done |= torch.isin(tok, stop)
            if done.all():
                return
        if step == max_new_tokens - 1:
            return
        next_logits = step_fn(tok)
