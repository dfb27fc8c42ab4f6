"""Compiled (numba) loops of the similarity walk. `lorydata.walk` is the API and explains
the algorithm. Every kernel works on flat arrays with O(N·k) memory and no Python objects.

A set of chains is `order` (all documents, chain after chain), `offsets` (C+1 positions:
chain c is order[offsets[c]:offsets[c+1]]) and `link` (link[i] = similarity of order[i]
and order[i+1] inside a chain, NaN at a chain's last position). Similarities of links are
carried along, so later steps rarely need to look a pair up again.

At a million documents these loops are bound by memory latency (every step of a walk
reads the row of a random document, 160 bytes somewhere in a 160 MB array). So several
chains grow in lockstep, loops prefetch the memory of items a few iterations ahead, and
the pass over chain ends visits them in increasing id order, a forward sweep.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_AHEAD = 8  # items ahead (per dependency level) whose memory loops prefetch
# Name of LLVM's prefetch intrinsic for a plain pointer (typed pointers before LLVM 15).
_PREFETCH = "llvm.prefetch.p0" if llvm_binding.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"


def _prefetch_codegen(context, builder, sig, args):
    array_type = sig.args[0]
    view = context.make_array(array_type)(context, builder, args[0])
    pointer = cgutils.get_item_pointer(context, builder, array_type, view, list(args[1:]), wraparound=False)
    i32 = ir.IntType(32)
    byte_pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
    function_type = ir.FunctionType(ir.VoidType(), [byte_pointer.type, i32, i32, i32])
    prefetch = cgutils.get_or_insert_function(builder.module, function_type, _PREFETCH)
    builder.call(prefetch, [byte_pointer, i32(0), i32(3), i32(1)])  # read, keep in all caches, data
    return context.get_dummy_value()


@intrinsic
def _prefetch_item(typingctx, array, index):
    return types.void(array, index), _prefetch_codegen


@intrinsic
def _prefetch_cell(typingctx, array, row, column):
    return types.void(array, row, column), _prefetch_codegen


@nb.njit(cache=True)
def prefetch(array, index):
    """Ask the CPU to start loading `array[index]` into cache: one element of a 1-D array,
    every cache line of a row of a 2-D one.

    A hint only: results never depend on it. The walk's passes are bound by the latency of
    random reads; issuing the reads of upcoming items early lets them overlap.
    """
    if array.ndim == 1:
        _prefetch_item(array, index)
    else:
        step = max(1, 64 // array.itemsize)  # elements per 64-byte cache line
        for column in range(0, array.shape[1], step):
            _prefetch_cell(array, index, column)
        _prefetch_cell(array, index, array.shape[1] - 1)  # a row need not start on a line


@nb.njit(cache=True)
def scan_graph(neighbors):
    """One pass over the neighbour ids: (in-degree of every document, number of ids
    outside [-1, N))."""
    n = neighbors.shape[0]
    degree = np.zeros(n, np.int32)
    bad = 0
    for i in range(n):
        for j in range(neighbors.shape[1]):
            other = neighbors[i, j]
            if other < -1 or other >= n:
                bad += 1
            elif other >= 0:
                degree[other] += 1
    return degree, bad


@nb.njit(cache=True)
def rows_sorted(neighbors, sims, rows):
    """Whether the given rows list valid neighbours first, most similar first."""
    for i in rows:
        for j in range(1, neighbors.shape[1]):
            if neighbors[i, j] >= 0 and (neighbors[i, j - 1] < 0 or sims[i, j] > sims[i, j - 1]):
                return False
    return True


@nb.njit(cache=True)
def queue_by_degree(degree):
    """Documents by increasing in-degree, ties by id: a counting sort, O(N)."""
    n = degree.shape[0]
    top = 0
    for i in range(n):
        top = max(top, np.int64(degree[i]))
    starts = np.zeros(top + 2, np.int64)
    for i in range(n):
        starts[degree[i] + 1] += 1
    for d in range(1, top + 2):
        starts[d] += starts[d - 1]
    queue = np.empty(n, np.int64)
    for i in range(n):
        queue[starts[degree[i]]] = i
        starts[degree[i]] += 1
    return queue


@nb.njit(cache=True)
def _take_start(start_queue, queue_pos, visited):
    """Next unvisited document of the start queue: (document or -1, new queue position)."""
    while queue_pos < start_queue.shape[0] and visited[start_queue[queue_pos]]:
        queue_pos += 1
    if queue_pos == start_queue.shape[0]:
        return -1, queue_pos
    return start_queue[queue_pos], queue_pos


@nb.njit(cache=True)
def greedy_chains(neighbors, sims, start_queue, walkers):
    """Nearest-unvisited-neighbour chains.

    A chain starts at the first unvisited document of `start_queue`, steps to the most
    similar unvisited neighbour (rows are sorted best first) until stuck, then grows
    backwards from its start the same way (similarity is symmetric).

    `walkers` chains grow in lockstep, one step each per round, each prefetching the row it
    will read next as soon as it knows it: a single walk waits on one random memory read
    per step, several overlap those waits (8 walkers: 3x faster at a million documents). Each
    step is still the plain greedy step; walkers only compete for unvisited documents the
    way consecutive chains of one walker do. The chain buffers are reserved at 2N per
    walker but only the pages a chain actually uses get touched.

    Returns:
        (order, offsets, link) of the chains, in the order they were finished.
    """
    n = neighbors.shape[0]
    k = neighbors.shape[1]
    visited = np.zeros(n, np.bool_)
    order = np.empty(n, np.int64)
    link = np.full(n, np.nan, np.float32)
    offsets = np.empty(n + 1, np.int64)
    # Walker w builds its chain in buf[w, left:right], growing right (forward) from the
    # middle and left (backward); bsim[w, i] is the similarity of buf[w, i] and buf[w, i+1].
    buf = np.empty((walkers, 2 * n + 1), np.int64)
    bsim = np.empty((walkers, 2 * n + 1), np.float32)
    left = np.full(walkers, n, np.int64)
    right = np.full(walkers, n + 1, np.int64)
    node = np.full(walkers, -1, np.int64)
    forward = np.ones(walkers, np.bool_)
    queue_pos = 0
    pos = 0
    chains = 0
    active = 0
    for w in range(walkers):
        start, queue_pos = _take_start(start_queue, queue_pos, visited)
        if start < 0:
            break
        visited[start] = True
        buf[w, n] = start
        node[w] = start
        active += 1
    while active > 0:
        for w in range(walkers):
            u = node[w]
            if u < 0:
                continue
            nxt = -1
            sim = np.float32(np.nan)
            for j in range(k):
                v = neighbors[u, j]
                if v >= 0 and not visited[v]:
                    nxt, sim = v, sims[u, j]
                    break
            if nxt >= 0:
                visited[nxt] = True
                if forward[w]:
                    bsim[w, right[w] - 1] = sim
                    buf[w, right[w]] = nxt
                    right[w] += 1
                else:
                    left[w] -= 1
                    buf[w, left[w]] = nxt
                    bsim[w, left[w]] = sim
                node[w] = nxt
                prefetch(neighbors, nxt)  # read again after the other walkers' steps
                _prefetch_cell(sims, nxt, 0)  # the similarity taken is usually among the first
                continue
            if forward[w]:  # stuck going forward: grow backwards from the start
                forward[w] = False
                node[w] = buf[w, n]
                prefetch(neighbors, node[w])
                continue
            offsets[chains] = pos
            chains += 1
            for i in range(left[w], right[w]):
                order[pos] = buf[w, i]
                if i < right[w] - 1:
                    link[pos] = bsim[w, i]
                pos += 1
            start, queue_pos = _take_start(start_queue, queue_pos, visited)
            if start < 0:
                node[w] = -1
                active -= 1
                continue
            visited[start] = True
            buf[w, n] = start
            left[w], right[w] = n, n + 1
            node[w] = start
            prefetch(neighbors, start)
            forward[w] = True
    offsets[chains] = n
    return order, offsets[: chains + 1].copy(), link


@nb.njit(cache=True)
def _find(parent, item):
    root = item
    while parent[root] != root:
        root = parent[root]
    while parent[item] != root:
        parent[item], item = root, parent[item]
    return root


@nb.njit(cache=True)
def join_chains(order, offsets, link, cand_u, cand_v, cand_s):
    """Link chain ends greedily: the best candidate pairs first, each end used once, no cycles.

    Args:
        order, offsets, link: the chains.
        cand_u, cand_v, cand_s: candidate links between ends of two chains and their
            similarities, sorted best first.

    Returns:
        (order, offsets, link, links): the joined chains (each a path of old chains,
        oriented so that linked ends are adjacent) and how many links were made.
    """
    n = order.shape[0]
    n_chains = offsets.shape[0] - 1
    chain_of = np.full(n, -1, np.int64)
    free = np.zeros(n, np.int8)  # open link slots of a chain end: 2 for a single document
    for c in range(n_chains):
        head, tail = order[offsets[c]], order[offsets[c + 1] - 1]
        chain_of[head] = c
        chain_of[tail] = c
        free[head] += 1
        free[tail] += 1
    link_a = np.full(n, -1, np.int64)
    link_b = np.full(n, -1, np.int64)
    sim_a = np.zeros(n, np.float32)
    sim_b = np.zeros(n, np.float32)
    parent = np.arange(n_chains)
    links = 0
    for i in range(cand_u.shape[0]):
        u, v = cand_u[i], cand_v[i]
        if free[u] == 0 or free[v] == 0:
            continue
        root_u, root_v = _find(parent, chain_of[u]), _find(parent, chain_of[v])
        if root_u == root_v:
            continue
        parent[root_u] = root_v
        for a, b in ((u, v), (v, u)):
            free[a] -= 1
            if link_a[a] < 0:
                link_a[a], sim_a[a] = b, cand_s[i]
            else:
                link_b[a], sim_b[a] = b, cand_s[i]
        links += 1
    new_order = np.empty(n, np.int64)
    new_link = np.full(n, np.nan, np.float32)
    new_offsets = np.empty(n_chains + 1, np.int64)
    done = np.zeros(n_chains, np.bool_)
    pos = 0
    n_new = 0
    for first in range(n_chains):
        if done[first]:
            continue
        head, tail = order[offsets[first]], order[offsets[first + 1] - 1]
        if head == tail:
            if link_b[head] >= 0:
                continue  # linked on both sides: inside a path
            entry = head
        elif link_a[head] < 0:
            entry = head
        elif link_a[tail] < 0:
            entry = tail
        else:
            continue
        new_offsets[n_new] = pos
        n_new += 1
        c = first
        came_from = -1
        while True:
            done[c] = True
            begin, end = offsets[c], offsets[c + 1]
            if entry == order[begin]:
                for i in range(begin, end):
                    new_order[pos] = order[i]
                    new_link[pos] = link[i]
                    pos += 1
                exit_node = order[end - 1]
            else:
                for i in range(end - 1, begin - 1, -1):
                    new_order[pos] = order[i]
                    new_link[pos] = link[i - 1] if i > begin else np.nan
                    pos += 1
                exit_node = order[begin]
            nxt, nxt_sim = link_a[exit_node], sim_a[exit_node]
            if nxt == came_from:  # only a single-document chain has its way back on this node
                nxt, nxt_sim = link_b[exit_node], sim_b[exit_node]
            if nxt < 0:
                break
            new_link[pos - 1] = nxt_sim
            came_from = exit_node
            c = chain_of[nxt]
            entry = nxt
    new_offsets[n_new] = n
    return new_order, new_offsets[: n_new + 1].copy(), new_link, links


@nb.njit(cache=True, fastmath=True)
def _pair_sim(u, v, neighbors, sims, emb):
    """Cosine of two documents: exact from `emb` when given, else from either kNN row, else NaN."""
    if emb.shape[0] > 0:
        total = 0.0
        for i in range(emb.shape[1]):
            total += emb[u, i] * emb[v, i]
        return total
    for j in range(neighbors.shape[1]):
        if neighbors[u, j] == v:
            return sims[u, j]
    for j in range(neighbors.shape[1]):
        if neighbors[v, j] == u:
            return sims[v, j]
    return np.nan


@nb.njit(cache=True)
def _angle_sum_bound(c1, c2):
    """Lower bound of cos(u, q) from cos(u, p) = c1 and cos(p, q) = c2 (angles add at most)."""
    s1 = np.sqrt(max(0.0, 1.0 - c1 * c1))
    s2 = np.sqrt(max(0.0, 1.0 - c2 * c2))
    return c1 * c2 - s1 * s2


@nb.njit(cache=True)
def _angle(c):
    return np.arccos(min(1.0, max(-1.0, c)))


@nb.njit(cache=True)
def _sim_or_bound(u, v, inner, c1, c2, neighbors, sims, emb):
    """`_pair_sim`, or when unknown the lower bound cos(inner + angle(c1) + angle(c2)) from a
    path u .. -> -> v whose first stretch spans the angle `inner` and whose two last steps
    have cosines c1, c2 (computed only when needed: arccos is not cheap)."""
    sim = _pair_sim(u, v, neighbors, sims, emb)
    if np.isnan(sim):
        total = inner + _angle(c1) + _angle(c2)
        sim = np.cos(total) if total < np.pi else -1.0
    return np.float32(sim)


@nb.njit(cache=True)
def _keep_best(buf_v, buf_s, count, v, s):
    """Insert candidate v (similarity s) into a best-first buffer; returns its new size."""
    size = buf_v.shape[0]
    for i in range(count):
        if buf_v[i] == v:
            return count
    if count == size and s <= buf_s[size - 1]:
        return count
    i = min(count, size - 1)
    while i > 0 and buf_s[i - 1] < s:
        buf_v[i], buf_s[i] = buf_v[i - 1], buf_s[i - 1]
        i -= 1
    buf_v[i], buf_s[i] = v, s
    return min(count + 1, size)


@nb.njit(cache=True)
def order_desc(values, buckets=4096):
    """Indices of cosine similarities from high to low: a counting sort on 4096 buckets of
    [-1, 1] (ties within 1/2048 keep their input order, which is all a greedy pass needs)."""
    counts = np.zeros(buckets + 1, np.int64)
    keys = np.empty(values.shape[0], np.int64)
    for i in range(values.shape[0]):
        key = int((1.0 - min(1.0, max(-1.0, values[i]))) * 0.5 * (buckets - 1))
        keys[i] = key
        counts[key + 1] += 1
    for b in range(1, buckets + 1):
        counts[b] += counts[b - 1]
    out = np.empty(values.shape[0], np.int64)
    for i in range(values.shape[0]):
        out[counts[keys[i]]] = i
        counts[keys[i]] += 1
    return out


@nb.njit(cache=True)
def end_candidates(order, offsets, neighbors, sims, via, per_end):
    """Candidate links between ends of different chains, best first.

    For every chain end u, the `per_end` most similar ends of other chains among its kNN
    neighbours and, through its `via` most similar neighbours p, among the neighbours of p
    (two hops). A two-hop candidate q is scored by the lower bound of its similarity,
    cos(angle(u, p) + angle(p, q)); re-scoring with the embeddings ranked no better in our
    measurements and costs a random read per candidate.

    Returns:
        (cand_u, cand_v, cand_s) sorted by decreasing similarity.
    """
    n = order.shape[0]
    k = neighbors.shape[1]
    chain_of = np.full(n, -1, np.int32)
    # One bit per document says "is a chain end": 128 KB per million documents stays in
    # cache and spares most lookups in chain_of.
    is_end = np.zeros((n >> 6) + 1, np.uint64)
    n_ends = 0
    for c in range(offsets.shape[0] - 1):
        for end in (order[offsets[c]], order[offsets[c + 1] - 1]):
            chain_of[end] = c
            is_end[end >> 6] |= np.uint64(1) << np.uint64(end & 63)
        n_ends += 1 if offsets[c + 1] - offsets[c] == 1 else 2
    cu = np.empty(n_ends * per_end, np.int64)
    cv = np.empty(n_ends * per_end, np.int64)
    cs = np.empty(n_ends * per_end, np.float32)
    buf_v = np.empty(per_end, np.int64)
    buf_s = np.empty(per_end, np.float32)
    ends = np.empty(n_ends, np.int64)
    e = 0
    for u in range(n):  # ends in id order: their row reads sweep forward through memory
        if chain_of[u] >= 0:
            ends[e] = u
            e += 1
    m = 0
    for i in range(e):
        if i + 2 * _AHEAD < e:  # the rows of an end further ahead, then its two-hop rows
            prefetch(neighbors, ends[i + 2 * _AHEAD])
            prefetch(sims, ends[i + 2 * _AHEAD])
        if i + _AHEAD < e:
            for j in range(min(via, k)):
                if neighbors[ends[i + _AHEAD], j] >= 0:
                    prefetch(neighbors, neighbors[ends[i + _AHEAD], j])
                    prefetch(sims, neighbors[ends[i + _AHEAD], j])
        u = ends[i]
        c = chain_of[u]
        count = 0
        for j in range(k):
            p = neighbors[u, j]
            if p < 0 or (count == per_end and sims[u, j] <= buf_s[per_end - 1]):
                break  # nothing later in the row, direct or through p, can beat the kept ones
            if chain_of[p] >= 0 and chain_of[p] != c:
                count = _keep_best(buf_v, buf_s, count, p, sims[u, j])
            if j >= via:
                continue
            # Through p a candidate q scores cos(angle(u, p) + angle(p, q)); p's row is sorted,
            # so once that cannot beat the worst kept candidate the rest of the row cannot.
            floor = -2.0
            if count == per_end:
                floor = np.cos(max(0.0, _angle(buf_s[per_end - 1]) - _angle(sims[u, j])))
            for jj in range(k):
                q = neighbors[p, jj]
                if q < 0 or sims[p, jj] <= floor:
                    break
                if not (is_end[q >> 6] >> np.uint64(q & 63)) & np.uint64(1) or chain_of[q] == c:
                    continue
                bound = _angle_sum_bound(sims[u, j], sims[p, jj])
                if count < per_end or bound > buf_s[per_end - 1]:
                    count = _keep_best(buf_v, buf_s, count, q, bound)
                    if count == per_end:
                        floor = np.cos(max(0.0, _angle(buf_s[per_end - 1]) - _angle(sims[u, j])))
        for t in range(count):
            cu[m], cv[m], cs[m] = u, buf_v[t], buf_s[t]
            m += 1
    best = order_desc(cs[:m])
    return cu[:m][best], cv[:m][best], cs[:m][best]


@nb.njit(cache=True)
def _reverse_run(first, nxt, prv, next_sim):
    """Reverse the linked run starting at position `first` in place, keeping next_sim aligned."""
    carry = np.float32(np.nan)
    at = first
    while at >= 0:
        after = nxt[at]
        carry, next_sim[at] = next_sim[at], carry
        nxt[at], prv[at] = prv[at], nxt[at]
        at = after


@nb.njit(cache=True)
def _prefetch_rehome(level, c, order, offsets, neighbors, sims, emb, reach, where, nxt, prv, next_sim, placed):
    """Prefetch what re-homing short chain c reads, one dependency level per call, so that
    each level finds the previous one in cache: 5 the ends' rows and vectors, 4 where their
    candidates p sit, 3 the list entries at p, 2 p's neighbours in the list, 1 their vectors."""
    for at in (offsets[c], offsets[c + 1] - 1):
        end = order[at]
        if level == 5:
            prefetch(neighbors, end)
            _prefetch_cell(sims, end, 0)
            if emb.shape[0] > 0:
                prefetch(emb, end)
            continue
        for j in range(min(reach, neighbors.shape[1])):
            p = neighbors[end, j]
            if p < 0:
                break
            if level == 4:
                prefetch(where, p)
                continue
            p_at = where[p]
            if level == 3:
                prefetch(nxt, p_at)
                prefetch(prv, p_at)
                prefetch(next_sim, p_at)
                prefetch(placed, p_at)
                continue
            for q_at in (nxt[p_at], prv[p_at]):
                if q_at < 0:
                    continue
                if level == 2:
                    prefetch(order, q_at)
                elif emb.shape[0] > 0:
                    prefetch(emb, order[q_at])
                else:
                    prefetch(neighbors, order[q_at])


@nb.njit(cache=True)
def rehome_short_chains(order, offsets, link, neighbors, sims, emb, min_chain, min_gain, reach):
    """Splice chains shorter than `min_chain` next to their most similar placed document.

    For a short chain with ends a..b, each of the first `reach` kNN neighbours p of a or b
    that lies in a long chain (or in a short chain re-homed before) offers two slots,
    (prev(p), p) and (p, next(p)). The chain goes into the slot with the largest gain in
    adjacent similarity, s(p, end) + s(other end, q) - s(p, q), or just s(p, end) where p
    ends its chain. Chains without a slot whose gain exceeds `min_gain` stay as they are.
    s(other end, q) is exact with `emb`, else looked up in the kNN rows, else bounded from
    below by the path other end .. end -> p -> q (`_sim_or_bound`).

    The linked list runs over positions in `order` (not document ids), so building it and
    reading it back are sequential sweeps; only the candidates are random accesses.

    Returns:
        (order, offsets, link, rehomed_chains, rehomed_docs).
    """
    n = order.shape[0]
    n_chains = offsets.shape[0] - 1
    where = np.empty(n, np.int64)
    nxt = np.empty(n, np.int64)
    prv = np.empty(n, np.int64)
    next_sim = link.copy()
    placed = np.empty(n, np.bool_)
    for c in range(n_chains):
        begin, end = offsets[c], offsets[c + 1]
        long_chain = end - begin >= min_chain
        for i in range(begin, end):
            where[order[i]] = i
            nxt[i] = i + 1 if i + 1 < end else -1
            prv[i] = i - 1 if i > begin else -1
            placed[i] = long_chain
    n_short = 0
    for c in range(n_chains):
        if offsets[c + 1] - offsets[c] < min_chain:
            n_short += 1
    short = np.empty(n_short, np.int64)
    n_short = 0
    for c in range(n_chains):
        if offsets[c + 1] - offsets[c] < min_chain:
            short[n_short] = c
            n_short += 1
    rehomed_chains = 0
    rehomed_docs = 0
    for i in range(n_short):
        for level in range(1, 6):  # see _prefetch_rehome
            if i + level * _AHEAD < n_short:
                _prefetch_rehome(level, short[i + level * _AHEAD], order, offsets, neighbors, sims, emb, reach,
                                 where, nxt, prv, next_sim, placed)
        c = short[i]
        head_at, tail_at = offsets[c], offsets[c + 1] - 1
        if placed[head_at]:
            continue
        best_gain = -np.inf
        best_x, best_y, best_first, best_sx, best_sy = -1, -1, -1, np.float32(0), np.float32(0)
        for side in range(2):
            if side == 1 and head_at == tail_at:
                break
            e_at = head_at if side == 0 else tail_at
            other_at = tail_at if side == 0 else head_at
            e, other = order[e_at], order[other_at]
            # Angle along the short chain from e to its other end: with the angles to p and
            # on to p's neighbour it bounds an unknown similarity from below.
            inner = 0.0
            at = head_at
            while at != tail_at:
                inner += _angle(next_sim[at])
                at = nxt[at]
            for j in range(min(reach, neighbors.shape[1])):
                p = neighbors[e, j]
                if p < 0:
                    break
                p_at = where[p]
                if not placed[p_at]:
                    continue
                s_pe = sims[e, j]
                y_at = nxt[p_at]  # slot after p: p -> e ... other -> y
                gain, s_y = s_pe, np.float32(np.nan)
                if y_at >= 0:
                    s_y = _sim_or_bound(other, order[y_at], inner, s_pe, next_sim[p_at], neighbors, sims, emb)
                    gain += s_y - next_sim[p_at]
                if gain > best_gain:
                    best_gain, best_x, best_y, best_first, best_sx, best_sy = gain, p_at, y_at, e_at, s_pe, s_y
                x_at = prv[p_at]  # slot before p: x -> other ... e -> p
                gain, s_x = s_pe, np.float32(np.nan)
                if x_at >= 0:
                    s_x = _sim_or_bound(order[x_at], other, inner, s_pe, next_sim[x_at], neighbors, sims, emb)
                    gain += s_x - next_sim[x_at]
                if gain > best_gain:
                    best_gain, best_x, best_y, best_first, best_sx, best_sy = gain, x_at, p_at, other_at, s_x, s_pe
        if best_first < 0 or not best_gain > min_gain:
            continue
        last = tail_at if best_first == head_at else head_at
        if best_first != head_at:
            _reverse_run(head_at, nxt, prv, next_sim)
        if best_x >= 0:
            nxt[best_x] = best_first
            next_sim[best_x] = best_sx
        prv[best_first] = best_x
        nxt[last] = best_y
        if best_y >= 0:
            prv[best_y] = last
            next_sim[last] = best_sy
        at = best_first
        while at != best_y:
            placed[at] = True
            rehomed_docs += 1
            at = nxt[at]
        rehomed_chains += 1
    new_order = np.empty(n, np.int64)
    new_link = np.full(n, np.nan, np.float32)
    new_offsets = np.empty(n + 1, np.int64)
    pos = 0
    n_new = 0
    for i in range(n):  # chains in the order of their (new) first position
        if prv[i] >= 0:
            continue
        new_offsets[n_new] = pos
        n_new += 1
        at = i
        while at >= 0:
            new_order[pos] = order[at]
            if nxt[at] >= 0:
                new_link[pos] = next_sim[at]
            pos += 1
            at = nxt[at]
    new_offsets[n_new] = n
    return new_order, new_offsets[: n_new + 1].copy(), new_link, rehomed_chains, rehomed_docs


@nb.njit(cache=True)
def _find_fitting(parent, item):
    """Largest index <= item still available (parent[i] == i), or -1: path-halving union-find."""
    while item >= 0 and parent[item] != item:
        parent[item] = parent[parent[item]] if parent[item] >= 0 else -1
        item = parent[item]
    return item


@nb.njit(cache=True)
def _fill_sequence(out, pos, stream, seq_len, order, offsets, by_size, sizes, parent):
    """Append short chains (largest that fits first) until the current sequence is full or
    nothing fits; returns the new (pos, stream)."""
    room = seq_len - stream % seq_len
    while room < seq_len:
        slot = _find_fitting(parent, np.searchsorted(sizes, room, side="right") - 1)
        if slot < 0:
            break
        parent[slot] = slot - 1
        filler = by_size[slot]
        for i in range(offsets[filler], offsets[filler + 1]):
            out[pos] = order[i]
            pos += 1
        stream += sizes[slot]
        room -= sizes[slot]
        if room == 0:
            break
    return pos, stream


@nb.njit(cache=True)
def token_aware_layout(order, offsets, is_long, lengths, seq_len, stream_start):
    """Lay out long chains in order; wherever the stream is inside a packed sequence before
    a long chain starts (after the previous one, or at `stream_start`), fill the rest of
    that sequence with short chains that fit (largest first), so the breaks at the junction
    and around the fillers fall into one sequence instead of several. Short chains that
    fit nowhere follow at the end, in walk order.

    Args:
        order, offsets: the chains; is_long: (C,) which chains are long.
        lengths: tokens of every document (EOS excluded; packing adds one).
        seq_len: tokens per packed sequence.
        stream_start: token position of the first document in the packed stream.

    Returns:
        The document order.
    """
    n_chains = offsets.shape[0] - 1
    tokens = np.zeros(n_chains, np.int64)
    for c in range(n_chains):
        for i in range(offsets[c], offsets[c + 1]):
            tokens[c] += lengths[order[i]] + 1
    short = np.where(~is_long)[0]
    by_size = short[np.argsort(tokens[short], kind="mergesort")]
    sizes = tokens[by_size]
    parent = np.arange(by_size.shape[0])
    out = np.empty(order.shape[0], np.int64)
    pos = 0
    stream = stream_start
    for c in range(n_chains):
        if not is_long[c]:
            continue
        pos, stream = _fill_sequence(out, pos, stream, seq_len, order, offsets, by_size, sizes, parent)
        for i in range(offsets[c], offsets[c + 1]):
            out[pos] = order[i]
            pos += 1
        stream += tokens[c]
    placed_short = np.zeros(n_chains, np.bool_)
    for slot in range(by_size.shape[0]):
        placed_short[by_size[slot]] = parent[slot] != slot  # used slots point below themselves
    for c in range(n_chains):
        if is_long[c] or placed_short[c]:
            continue
        for i in range(offsets[c], offsets[c + 1]):
            out[pos] = order[i]
            pos += 1
    return out


@nb.njit(cache=True)
def long_then_short(order, offsets, is_long):
    """The documents of the long chains in order, then those of the short ones."""
    out = np.empty(order.shape[0], np.int64)
    pos = 0
    for want_long in (True, False):
        for c in range(offsets.shape[0] - 1):
            if is_long[c] == want_long:
                for i in range(offsets[c], offsets[c + 1]):
                    out[pos] = order[i]
                    pos += 1
    return out
