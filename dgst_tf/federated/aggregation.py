"""The server's step: average the devices' sparse updates into the global model.

    from dgst_tf.federated.aggregation import aggregate
    new_weights, updaters = aggregate(weights, [(examples_a, entries_a),
                                                (examples_b, entries_b)])

**Choice: FedAvg per channel, over the clients that updated the channel.** For every weight
array and channel c (the unit a sparse step updates, `payload.channel_axis`)::

    w[c] <- w[c] + sum_{k updated c} n_k * delta_k[c] / sum_{k updated c} n_k

with n_k the number of examples client k trained on this round. When every client sends every
channel (dense fine-tuning, last layer, biases) this is FedAvg (McMahan et al. 2017) exactly.
Why not plain FedAvg, which divides by the examples of *all* clients (a client that did not
touch c counts as a zero delta)? With DGSU a client changes a few percent of a layer's
channels per step, different ones on different clients, so most channels are updated by one
or a few clients per round; plain FedAvg would scale each channel's step by the fraction of
clients that happened to update it, shrinking sparse updates by up to N times and making the
server's effective learning rate differ from channel to channel for no reason in the data.
Averaging over the updaters keeps every channel's step the size of a local step, the weighted
mean of the updates that exist, and weights each updater by its examples as FedAvg does.
The price: a channel only one client updated takes that client's update unaveraged, which
under non-IID data pulls it towards that client (the per-round counts are returned, so the
benchmark can report them). ``per_channel=False`` gives plain FedAvg for comparison.

Devices that train the int8 graph exchange integer codes; ``integer_ranges`` names those
arrays and the average is rounded to the nearest integer (half to even) and clipped to the
array's range (int8 kernels -127..127, int32 biases), so the global model stays a valid int8
model.
"""
from __future__ import annotations

import numpy as np

from dgst_tf.federated.payload import Entry, by_channel, from_channels


def aggregate(weights, updates, per_channel: bool = True, integer_ranges=None):
    """(new weights, updaters): ``updates`` is a list of ``(num_examples, entries)``, one per
    client; ``updaters[i]`` counts, per channel of array i, the clients that sent it;
    ``integer_ranges`` ``{array index: (low, high)}``: arrays of integer codes (module doc).

        new, updaters = aggregate(global_weights, [(120, entries_1), (80, entries_2)])
    """
    weights = [np.asarray(w, np.float32) for w in weights]
    sums = [np.zeros(by_channel(w).shape, np.float64) for w in weights]
    examples = [np.zeros(len(s), np.float64) for s in sums]
    updaters = [np.zeros(len(s), np.int64) for s in sums]
    total = 0.0
    for num_examples, entries in updates:
        if not num_examples > 0:
            raise ValueError(f"a client update needs num_examples > 0, got {num_examples!r}")
        total += float(num_examples)
        for entry in entries:
            _accumulate(entry, float(num_examples), sums, examples, updaters, weights)
    new = []
    for index, (w, s, e) in enumerate(zip(weights, sums, examples)):
        denominator = e if per_channel else np.where(e > 0, total, 0.0)
        step = np.zeros_like(s)
        sent = denominator > 0
        step[sent] = s[sent] / denominator[sent].reshape((-1,) + (1,) * (s.ndim - 1))
        updated = w + from_channels(step, w.shape)
        if index in (integer_ranges or {}):
            updated = np.clip(np.rint(updated), *integer_ranges[index])
        new.append(updated.astype(np.float32))
    return new, updaters


def _accumulate(entry: Entry, num_examples: float, sums, examples, updaters, weights) -> None:
    if not 0 <= entry.array < len(weights):
        raise ValueError(f"update names weight array {entry.array}; the model has "
                         f"{len(weights)}")
    sums[entry.array][entry.channels] += num_examples * np.asarray(entry.values, np.float64)
    examples[entry.array][entry.channels] += num_examples
    updaters[entry.array][entry.channels] += 1
