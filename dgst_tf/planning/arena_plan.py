"""The head of TFLM's arena: where its memory planner puts each planned tensor, with the
offline plan the training export writes into the model (metadata
``OfflineMemoryAllocation``), in which a tensor an op computes in place shares memory with
the input it overwrites.

TFLM plans every non-constant, non-variable tensor (and the kernels' scratch buffers) in the
head: each buffer lives from the op that writes it to the op that reads it last, rounded up
to 16 bytes. Its ``GreedyMemoryPlanner`` puts offline-planned buffers at their offsets and
then the others, largest first, each at the lowest offset where it overlaps no placed
buffer that is live at the same time; the head is the largest end offset. `greedy_offsets`
is that algorithm, step for step (tflite-micro, ``greedy_memory_planner.cc``), so the
exporter and the memory model compute the same plan::

    from dgst_tf.planning.arena_plan import Buffer, Alias, offline_offsets, head_bytes

    buffers = [Buffer(49152, 0, 1), Buffer(32768, 1, 2), Buffer(8192, 2, 3)]
    offsets = offline_offsets(buffers, [Alias(0, 1, 0)])   # 1 computed in place over 0
    head_bytes(buffers, offsets)                           # 49152

Which ops may write over their input is a property of their kernels
(`tflm_ops/core`), stated here once: `fused_block_inplace_delta` (the row order of
``DGST_FUSED_BLOCK``), ``DGST_QUANTIZE_GRAD``, which writes dy[i] after reading g[i], from
the last element to the first, so dy may lie at the end of g (`quantize_grad_inplace_delta`),
and
``DGST_DEPTHWISE_INPUT_GRAD``, which writes the float gradient pixel by pixel over the int8
error signal it reads (`depthwise_input_grad_inplace_delta`). The training step also
computes a large weight gradient in chunks of input channels, each applied before the next
is computed (`weight_grad_chunks`), which the exporter and the memory model share too.
"""
from __future__ import annotations

import bisect
import dataclasses

__all__ = ["ALIGNMENT", "Buffer", "Alias", "aligned", "greedy_offsets", "offline_offsets", "aliased_offsets",
           "head_bytes", "planned_head", "fused_block_inplace_delta",
           "depthwise_input_grad_inplace_delta", "quantize_grad_inplace_delta",
           "weight_grad_chunks",
           "DEFAULT_WEIGHT_GRAD_CHUNK_BYTES"]

ALIGNMENT = 16  # TFLM's MicroArenaBufferAlignment: every planned size is rounded up to it
# the largest int32 weight gradient the training step computes at once (`weight_grad_chunks`):
# MobileNetV2's classifier gradient (1280 x 10, 50 KB) is otherwise its largest tensor
DEFAULT_WEIGHT_GRAD_CHUNK_BYTES = 32768


def aligned(n: int) -> int:
    return -(-int(n) // ALIGNMENT) * ALIGNMENT


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A planned buffer: ``size`` bytes live from op ``first`` to op ``last`` (inclusive);
    ``offset`` fixed (an offline plan) or -1 (placed by the planner)."""

    size: int
    first: int
    last: int
    offset: int = -1


@dataclasses.dataclass(frozen=True)
class Alias:
    """Buffer ``member`` starts ``delta`` bytes after buffer ``base`` (an op computing
    ``member`` in place over ``base``, which dies at that op)."""

    base: int
    member: int
    delta: int = 0


def greedy_offsets(buffers: list) -> list[int]:
    """TFLM's ``GreedyMemoryPlanner``: the offset of every buffer (sizes rounded up to 16).

        greedy_offsets([Buffer(64, 0, 1), Buffer(32, 1, 2), Buffer(32, 3, 4)])  # [0, 64, 0]
    """
    sizes = [aligned(b.size) for b in buffers]
    fixed = [i for i, b in enumerate(buffers) if b.offset >= 0]
    online = [i for i, b in enumerate(buffers) if b.offset < 0]
    online.sort(key=lambda i: -sizes[i])  # stable, as TFLM's ReverseSortInPlace
    offsets = [-1] * len(buffers)
    placed = []  # (offset, order of placement, buffer), sorted by offset then placement
    for order, i in enumerate(fixed + online):
        b = buffers[i]
        offset = b.offset if b.offset >= 0 else (0 if not placed else
                                                 _first_gap(placed, buffers, sizes, i))
        offsets[i] = offset
        bisect.insort(placed, (offset, order, i))
    return offsets


def _first_gap(placed, buffers, sizes, i) -> int:
    """The lowest offset after the buffers placed so far that are live with buffer ``i``
    where its size fits before the next such buffer."""
    b, candidate = buffers[i], 0
    for offset, _, j in placed:
        other = buffers[j]
        if other.first > b.last or b.first > other.last:
            continue
        if offset - candidate >= sizes[i]:
            return candidate
        candidate = max(candidate, offset + sizes[j])
    return candidate


def head_bytes(buffers: list, offsets: list) -> int:
    """The head: the largest end offset of the plan."""
    return max((o + aligned(b.size) for b, o in zip(buffers, offsets)), default=0)


def offline_offsets(buffers: list, aliases=()) -> list[int]:
    """`aliased_offsets` with a subset of ``aliases``: a chain of aliases fixes its members'
    offsets relative to each other over the whole step, which can cost more than the
    in-place ops save. Aliases are taken, largest saving first, where the chain they make
    spans no more bytes than it ever holds at once (`_compact_aliases`); then one at a
    time dropped while that lowers the head; the smaller head of that and of the same
    dropping from all of them wins.

        offline_offsets([Buffer(64, 0, 1), Buffer(32, 1, 2)], [Alias(0, 1, 32)])   # [0, 32]
    """
    plans = [_dropping(buffers, start) for start in
             (_compact_aliases(buffers, aliases), list(aliases))]
    return min(plans, key=lambda offsets: head_bytes(buffers, offsets))


def _dropping(buffers: list, aliases: list) -> list[int]:
    """The plan with ``aliases``, dropping each in turn while that lowers the head (judged
    by a single largest-first placement; the aliases kept are then planned in full)."""
    def quick(subset):
        groups = _groups(buffers, subset)
        order = sorted(groups, key=lambda g: -_extent(buffers, groups[g]))
        return head_bytes(buffers, _place(buffers, groups, order))

    kept = list(aliases)
    head = quick(kept)
    for alias in list(aliases):
        trial = [a for a in kept if a is not alias]
        trial_head = quick(trial)
        if trial_head < head:
            kept, head = trial, trial_head
    return aliased_offsets(buffers, kept)


def _saving(buffers: list, alias: Alias) -> int:
    """Bytes the alias saves while base and member are both live."""
    base, member = aligned(buffers[alias.base].size), aligned(buffers[alias.member].size)
    return max(0, min(alias.delta + member, base) - max(alias.delta, 0))


def _compact_aliases(buffers: list, aliases) -> list:
    """The aliases, largest saving first, each kept if the group it joins spans no more
    bytes than its members occupy at the busiest of their ops."""
    kept = []
    for alias in sorted(aliases, key=lambda a: -_saving(buffers, a)):
        groups = _groups(buffers, kept + [alias])
        group = next(members for members in groups.values()
                     if any(i == alias.member for i, _ in members))
        if _extent(buffers, group) <= _busiest(buffers, group):
            kept.append(alias)
    return kept


def _extent(buffers: list, members: list) -> int:
    return max(d + aligned(buffers[i].size) for i, d in members)


def _busiest(buffers: list, members: list) -> int:
    """The most bytes (lowest start to highest end) the members live at one op span."""
    ops = {t for i, _ in members for t in (buffers[i].first, buffers[i].last)}
    spans = [[(d, d + aligned(buffers[i].size)) for i, d in members
              if buffers[i].first <= t <= buffers[i].last] for t in ops]
    return max(max(e for _, e in live) - min(s for s, _ in live) for live in spans if live)


def _groups(buffers: list, aliases: list) -> dict:
    """``{root: [(buffer, offset in the group)]}``: the aliased groups (singletons too),
    each offset from the group's lowest member."""
    root = list(range(len(buffers)))
    delta = [0] * len(buffers)
    for alias in aliases:
        if alias.delta % ALIGNMENT:
            raise ValueError(f"offline_offsets: alias delta {alias.delta} is not a multiple "
                             f"of {ALIGNMENT}")
        base = _root(root, delta, alias.base)
        member = _root(root, delta, alias.member)
        if base == member:
            raise ValueError(f"offline_offsets: buffers {alias.base} and {alias.member} "
                             f"are aliased twice")
        root[member] = base
        delta[member] = delta[alias.base] + alias.delta - delta[alias.member]
    groups = {}
    for i in range(len(buffers)):
        groups.setdefault(_root(root, delta, i), []).append(i)
    low = {g: min(delta[i] for i in members) for g, members in groups.items()}
    return {g: [(i, delta[i] - low[g]) for i in members] for g, members in groups.items()}


def aliased_offsets(buffers: list, aliases=()) -> list[int]:
    """An offline plan of ``buffers`` in which each `Alias` member starts ``delta`` bytes
    after its base: groups of aliased buffers (singletons too) in turn, each at the lowest
    16-byte-aligned offset where none of its members overlaps a placed buffer live at the
    same time (three orders tried, `_orders`; the smallest head wins).

        aliased_offsets([Buffer(64, 0, 1), Buffer(32, 1, 2)], [Alias(0, 1, 32)])   # [0, 32]
    """
    groups = _groups(buffers, aliases)
    plans = [_improved(buffers, groups, sorted(groups, key=key))
             for key in _orders(buffers, groups)]
    return min(plans, key=lambda offsets: head_bytes(buffers, offsets))


def _improved(buffers: list, groups: dict, order: list, rounds: int = 24) -> list[int]:
    """`_place` in ``order``, then again with the group that sets the head moved to the
    front (a small long-lived tensor placed last lands above everything live in its
    lifetime), up to ``rounds`` times; the best plan."""
    best = _place(buffers, groups, order)
    for _ in range(rounds):
        ends = [o + aligned(b.size) for b, o in zip(buffers, best)]
        top = max(range(len(buffers)), key=ends.__getitem__)
        group = next(g for g, members in groups.items() if any(i == top for i, _ in members))
        if order[0] == group:
            break
        order = [group] + [g for g in order if g != group]
        offsets = _place(buffers, groups, order)
        if head_bytes(buffers, offsets) < head_bytes(buffers, best):
            best = offsets
    return best


def _orders(buffers: list, groups: dict) -> list:
    """Sort keys of the groups to try: largest first (TFLM's), earliest first, and the
    largest bytes x lifetime first; the plan with the smallest head wins."""
    def size(g):
        return max(aligned(buffers[i].size) for i, _ in groups[g])

    def first(g):
        return min(buffers[i].first for i, _ in groups[g])

    def span(g):
        return max(buffers[i].last for i, _ in groups[g]) - first(g) + 1

    return [lambda g: -size(g), lambda g: (first(g), -size(g)),
            lambda g: -size(g) * span(g)]


def _place(buffers: list, groups: dict, order: list) -> list[int]:
    """Offsets of the buffers, placing the groups in ``order`` at their lowest fit."""
    offsets = [-1] * len(buffers)
    placed = []  # (start, end, first, last)
    for g in order:
        at = _lowest_fit(placed, [(buffers[i], d) for i, d in groups[g]])
        for i, d in groups[g]:
            offsets[i] = at + d
            placed.append((at + d, at + d + aligned(buffers[i].size), buffers[i].first,
                           buffers[i].last))
    return offsets


def _lowest_fit(placed: list, members: list) -> int:
    """The lowest offset at which every (buffer, delta) of ``members`` overlaps no placed
    (start, end, first, last) live at the same time."""
    blocked = []  # open intervals of forbidden offsets
    for buffer, d in members:
        size = aligned(buffer.size)
        blocked += [(start - d - size, end - d) for start, end, first, last in placed
                    if not (first > buffer.last or buffer.first > last)]
    candidate = 0
    for low, high in sorted(blocked):
        if low < candidate < high:
            candidate = high
        elif low >= candidate:
            break
    return candidate


def _root(root: list, delta: list, i: int) -> int:
    """The group root of buffer ``i``, making ``delta[i]`` relative to it."""
    while root[i] != root[root[i]]:
        parent = root[i]
        delta[i] += delta[parent]
        root[i] = root[parent]
    return root[i]


def planned_head(buffers: list, aliases=(), scratch=()) -> int:
    """The head TFLM reaches: ``buffers`` at their offline plan (`offline_offsets`), then
    the kernels' ``scratch`` buffers, which TFLM always plans itself, around them.

        planned_head([Buffer(64, 0, 1)], scratch=[Buffer(32, 1, 1)])   # 96
    """
    offsets = offline_offsets(buffers, aliases)
    fixed = [dataclasses.replace(b, size=aligned(b.size), offset=o)
             for b, o in zip(buffers, offsets)]
    everything = fixed + [dataclasses.replace(s, offset=-1) for s in scratch]
    return head_bytes(everything, greedy_offsets(everything))


def fused_block_inplace_delta(in_bytes: int, in_row: int, out_rows: int, out_row: int,
                              mid_h: int, conv_stride: int, conv_pad: int, dw_h: int,
                              dw_stride: int, dw_pad: int) -> int | None:
    """Where ``DGST_FUSED_BLOCK`` may write its output over its input: the smallest
    16-byte-aligned ``delta`` >= 0 such that, the output starting ``delta`` bytes before
    the input, no output row overwrites an input row the block still reads; None if the
    two would then not overlap. The kernel (`tflm_ops/core/fused_block.c`) writes output
    row ``oy`` after computing the conv rows up to ``oy * dw_stride - dw_pad + dw_h - 1``,
    each once, in order, so input rows below ``(that + 1) * conv_stride - conv_pad`` are
    never read again.

        fused_block_inplace_delta(49152, 384, 64, 512, 64, 2, 0, 3, 1, 1)   # 0
    """
    delta = 0
    for oy in range(out_rows - 1):
        last_mid = min(oy * dw_stride - dw_pad + dw_h - 1, mid_h - 1)
        if last_mid >= mid_h - 1:
            break  # every conv row is computed: the input is read no more
        next_input_row = max(0, (last_mid + 1) * conv_stride - conv_pad)
        delta = max(delta, (oy + 1) * out_row - next_input_row * in_row)
    delta = aligned(delta)
    return delta if delta < out_rows * out_row else None


def depthwise_input_grad_inplace_delta(in_h: int, in_w: int, out_w: int, channels: int,
                                       kernel_h: int, stride_h: int, pad_top: int,
                                       dilation_h: int = 1) -> int:
    """Where ``DGST_DEPTHWISE_INPUT_GRAD`` may read its int8 dy from inside the float
    gradient it writes: the smallest 16-byte-aligned offset of dy after the gradient's
    start such that no pixel written overwrites a dy row still to be read. The kernel
    (`tflm_ops/core/depthwise_input_grad.c`) writes the input pixels in row-major order,
    4 channels at a time, reading for row iy dy rows >= ceil((iy + pad_top - (kernel_h - 1)
    * dilation_h) / stride_h).

        depthwise_input_grad_inplace_delta(8, 8, 8, 192, 3, 1, 1)   # 39936
    """
    pixel, dy_row = 4 * channels, out_w * channels

    def first_dy_row(iy: int) -> int:
        return max(0, -(-(iy + pad_top - (kernel_h - 1) * dilation_h) // stride_h))

    # a pixel's channels are written 4 at a time between reads of its other channels' dy
    delta = max((iy + 1) * in_w * pixel - first_dy_row(iy) * dy_row for iy in range(in_h))
    return aligned(max(0, delta))


def quantize_grad_inplace_delta(elements: int) -> int:
    """Where ``DGST_QUANTIZE_GRAD`` may write its int8 dy inside the float gradient it
    reads: dy[i], written from the last to the first after g[i] is read, overwrites no
    g[j] with j < i if dy starts at least ``3 * (elements - 1)`` bytes after g (16-byte
    aligned; dy then ends at most 12 bytes after g).

        quantize_grad_inplace_delta(12288)   # 36864
    """
    return aligned(3 * (int(elements) - 1)) if elements > 0 else 0


def weight_grad_chunks(kept: int, channel_bytes: int, chunk_bytes: int,
                       dynamic: bool = False) -> list:
    """The slices of the ``kept`` channels whose int32 weight gradients (``channel_bytes``
    per channel) the step computes and applies one after the other, each at most
    ``chunk_bytes`` where a channel fits (one slice if ``chunk_bytes`` is 0 or the
    channels are chosen on device). Each weight's gradient and update are the same
    whichever chunk holds it, so the results are too.

        weight_grad_chunks(1280, 40, 8192)   # 7 slices of 183 channels, the last of 182
    """
    if dynamic or not chunk_bytes or kept * channel_bytes <= chunk_bytes:
        return [slice(0, kept)]
    size = max(1, chunk_bytes // channel_bytes)
    count = -(-kept // size)
    size = -(-kept // count)  # as even as the count allows
    return [slice(start, min(start + size, kept)) for start in range(0, kept, size)]
