"""Split a labelled training set over N simulated devices: IID or Dirichlet non-IID, seeded.

    from dgst_tf.federated.partition import partition
    parts = partition(labels, clients=10, scheme="dirichlet", alpha=0.1, seed=0)
    x_client_3, y_client_3 = images[parts[3]], labels[parts[3]]

``"iid"`` shuffles the indices and deals them out in near-equal shares. ``"dirichlet"`` is the
usual label-skew split of Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification"): for every class, the shares of the N
clients are drawn from Dirichlet(alpha, ..., alpha) and that class's images are cut in those
proportions. Small alpha (0.1) gives each client a few dominant classes; large alpha
approaches IID. Draws are repeated (same generator, so still seeded) until every client has
at least ``min_examples`` images. The result is a list of N disjoint, sorted index arrays
covering every example. (Written here rather than taken from flwr-datasets, which reads
Hugging Face datasets and would need the `datasets` stack and a download.)
"""
from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "dirichlet")
MAX_DRAWS = 1000


def iid_partition(num_examples: int, clients: int, seed: int = 0) -> list[np.ndarray]:
    """``clients`` near-equal random shares of ``range(num_examples)``.

        parts = iid_partition(600, 3, seed=0)     # three arrays of 200 indices
    """
    _check_counts(num_examples, clients, 1)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet_partition(labels, clients: int, alpha: float, seed: int = 0,
                        min_examples: int = 1) -> list[np.ndarray]:
    """Label-skewed shares: each class split over the clients in Dirichlet(alpha) proportions.

        parts = dirichlet_partition(y, clients=10, alpha=0.1, seed=0)
    """
    labels = np.asarray(labels).ravel()
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha!r}")
    _check_counts(len(labels), clients, min_examples)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        parts = _dirichlet_draw(labels, clients, alpha, rng)
        if min(len(p) for p in parts) >= min_examples:
            return parts
    raise ValueError(f"no Dirichlet(alpha={alpha}) split of {len(labels)} examples over "
                     f"{clients} clients gave every client >= {min_examples} examples in "
                     f"{MAX_DRAWS} draws; use more examples, fewer clients or a larger alpha")


def _dirichlet_draw(labels: np.ndarray, clients: int, alpha: float, rng) -> list[np.ndarray]:
    shares = [[] for _ in range(clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(clients, float(alpha)))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for client, piece in enumerate(np.split(members, cuts)):
            shares[client].append(piece)
    return [np.sort(np.concatenate(s)).astype(np.int64) for s in shares]


def partition(labels, clients: int, scheme: str = "iid", alpha: float = 1.0,
              seed: int = 0) -> list[np.ndarray]:
    """The index arrays of ``clients`` devices by ``scheme`` ("iid" or "dirichlet").

        parts = partition(y, 10, "dirichlet", alpha=1.0, seed=0)
    """
    if scheme == "iid":
        return iid_partition(len(np.asarray(labels).ravel()), clients, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, clients, alpha, seed)
    raise ValueError(f"partition scheme must be one of {SCHEMES}, got {scheme!r}")


def _check_counts(num_examples: int, clients: int, min_examples: int) -> None:
    if isinstance(clients, bool) or not isinstance(clients, (int, np.integer)) or clients < 1:
        raise ValueError(f"clients must be an int >= 1, got {clients!r}")
    if num_examples < clients * min_examples:
        raise ValueError(f"{num_examples} examples cannot give {clients} clients "
                         f">= {min_examples} each")
