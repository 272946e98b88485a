"""Where a BE request's KV lives (OmniServe paper section 3.3): in SGLang's GPU KV cache, decoding
like an LS request, or in the BE KV pool with its decode attention on the CPU worker. The moves
between the two, between scheduler steps (never while the request is in a batch in flight).

- :func:`to_cpu`: the tokens the pool does not hold yet are copied from SGLang's KV cache into
  the pool (after the prefill: the whole prompt; later: what was decoded on the GPU), then the GPU
  slots the request owns go back; the prompt prefix stays in the radix cache, unpinned, for LS reuse.
- :func:`to_gpu`: fresh GPU slots (evicting from the radix cache if needed) get the pool's copy of
  every token, and the request's ``req_to_token`` row points at them; the pool keeps its copy, so
  a later move to the CPU only appends the tokens decoded meanwhile.

The request keeps its ``req_to_token`` row throughout (SGLang's ``FutureMap`` holds its next
input token there). Greedy output does not change with the moves: the same K/V values are read.
"""

from __future__ import annotations

import torch

from omniserve_sgl.be_runtime import BERuntime


def is_be(req) -> bool:
    """Whether SGLang's ``req`` is BE (``scheduler.tag_request`` marks it)."""
    return getattr(req, "omniserve_be", False)


def is_offloaded(req) -> bool:
    """Whether ``req``'s KV lives in the BE KV pool (its decode attention on the CPU worker)."""
    return getattr(req, "omniserve_offloaded", False)


def _layers(kv_pool, runtime: BERuntime) -> range:
    start = getattr(kv_pool, "start_layer", 0) or 0
    return range(start, start + runtime.pool.spec.num_layers)


def to_cpu(req, tree_cache, runtime: BERuntime) -> None:
    """Moves ``req``'s KV (``kv_committed_len`` tokens) to the BE KV pool and frees its GPU slots;
    ``req`` must hold its pool reservation (BE admission made it)."""
    kv = req.kv
    n = kv.kv_committed_len
    held = runtime.stored_tokens(req.rid)
    slots = tree_cache.req_to_token_pool.req_to_token[kv.req_pool_idx, held:n].to(torch.int64)
    kv_pool = tree_cache.token_to_kv_pool_allocator.get_kvcache()
    runtime.store_kv(req.rid, ((kv_pool.get_key_buffer(i)[slots], kv_pool.get_value_buffer(i)[slots])
                               for i in _layers(kv_pool, runtime)))
    # Give back what the request owns on the GPU; the tree keeps (and may evict) the prefix.
    if kv.cache_protected_len < kv.kv_allocated_len:
        tree_cache.free_kv_row(kv, [(kv.cache_protected_len, kv.kv_allocated_len)])
    tree_cache.unlock(req.lock)
    req.lock = None
    req.omniserve_offloaded = True


def gpu_slots_free(tree_cache) -> int:
    """GPU KV slots a move back could take now: free ones plus what the radix cache can evict."""
    return tree_cache.token_to_kv_pool_allocator.available_size() + tree_cache.evictable_size()


def to_gpu(req, tree_cache, runtime: BERuntime) -> bool:
    """Moves ``req``'s KV from the BE KV pool into fresh GPU slots (the pool keeps its copy);
    False, with nothing changed, when the GPU KV cache cannot take it now."""
    from sglang.srt.mem_cache.allocation import alloc_token_slots

    kv = req.kv
    n = kv.kv_committed_len
    if runtime.stored_tokens(req.rid) != n or gpu_slots_free(tree_cache) < n:
        return False
    slots = alloc_token_slots(tree_cache, n)
    kv_pool = tree_cache.token_to_kv_pool_allocator.get_kvcache()
    index = slots.to(torch.int64)
    for i, (k, v) in zip(_layers(kv_pool, runtime), runtime.load_kv(req.rid), strict=True):
        kv_pool.set_kv_buffer(None, index, k.to(slots.device), v.to(slots.device), layer_id_override=i)
    tree_cache.req_to_token_pool.write((kv.req_pool_idx, slice(0, n)), slots.to(torch.int32))
    # The request owns every slot; none is the tree's (a later insert deduplicates against it).
    kv.cache_protected_len = kv.cache_inserted_len = 0
    kv.kv_allocated_len = n
    req.omniserve_offloaded = False
    return True
