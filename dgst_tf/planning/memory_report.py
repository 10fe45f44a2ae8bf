"""The memory report of one scheme on one model: per-layer rows (`LayerMemory`), the totals
and peaks (`MemoryReport`, with its text table), a PNG chart, and a check against TFLM.

    from dgst_tf.planning.memory import training_memory
    from dgst_tf.planning.memory_report import plot_memory, compare_with_tflm

    report = training_memory(model, scheme, (128, 128, 3))   # a MemoryReport
    print(report.table())                       # per-layer breakdown and summary
    plot_memory(report, "memory.png")            # per-layer bars + dense vs sparse
    compare_with_tflm(report, arena_bytes, "arena")   # against TFLM's arena of the export

The numbers and their assumptions come from `dgst_tf.planning.memory`. KB means 1024 bytes.
"""
from __future__ import annotations

import dataclasses
import io
import os

from dgst_tf.core.files import write_atomically

KB = 1024


@dataclasses.dataclass
class LayerMemory:
    """Memory of one op of the training step, in bytes (``extra_memory_bits`` in bits).

    ``held_bytes`` is what the layer keeps for the whole step (saved input, masks, SRAM
    weights and biases, optimizer state); ``forward_live_bytes`` / ``backward_live_bytes``
    is all SRAM in use while this op runs forward / backward (0: not in the backward pass).
    """

    name: str
    kind: str
    update: str
    output_shape: tuple
    kept_channels: int = 0
    activation_bytes: int = 0
    saved_input_bytes: int = 0
    mask_bytes: int = 0
    weight_bytes: int = 0
    bias_bytes: int = 0
    optimizer_bytes: int = 0
    weight_gradient_bytes: int = 0
    forward_live_bytes: int = 0
    backward_live_bytes: int = 0
    extra_memory_bits: int = 0

    @property
    def held_bytes(self) -> int:
        return (self.saved_input_bytes + self.mask_bytes + self.weight_bytes
                + self.bias_bytes + self.optimizer_bytes)

    def parts(self) -> dict:
        """Non-zero held parts, e.g. ``{"saved input": 4096, "weights": 768}``."""
        parts = {"saved input": self.saved_input_bytes, "masks": self.mask_bytes,
                 "weights": self.weight_bytes, "biases": self.bias_bytes,
                 "optimizer state": self.optimizer_bytes}
        return {k: v for k, v in parts.items() if v}

    def describe(self) -> str:
        """``"block_16_expand (weights 1/4): 12.0 KB = saved input 3.0 KB + ..."``."""
        parts = " + ".join(f"{k} {kb(v)}" for k, v in self.parts().items())
        return f"{self.name} ({self.update}): {kb(self.held_bytes)}" + (
            f" = {parts}" if parts else "")


@dataclasses.dataclass
class MemoryReport:
    """The memory of one scheme on one model (see the module doc for the assumptions).

        report = training_memory(model, scheme, (128, 128, 3))
        report.training_peak_bytes, report.extra_memory_bytes, report.largest(3)
        report.arena_bytes        # TFLM's arena: the training peak + TFLM's own structs
    """

    model_name: str
    scheme_name: str
    input_shape: tuple
    layers: list
    extra_memory_bits: int
    forward_peak_bytes: int
    training_peak_bytes: int
    peak_phase: str
    peak_layer: str
    peak_breakdown: dict
    dense_training_bytes: int | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)
    arena_bytes: int | None = None  # TFLM's whole arena for the step (its structs too)

    @property
    def extra_memory_bytes(self) -> int:
        """Lin et al.'s label in bytes (bits / 8, rounded up)."""
        return -(-self.extra_memory_bits // 8)

    @property
    def extra_memory_kb(self) -> float:
        """Lin et al.'s label in KB (bits / 8 / 1024, as tiny-training prints it)."""
        return self.extra_memory_bits / 8 / KB

    @property
    def runtime_bytes(self) -> int | None:
        """TFLM's own part of the arena: structs, op data and alignment."""
        if self.arena_bytes is None:
            return None
        return self.arena_bytes - self.training_peak_bytes

    @property
    def saving_bytes(self) -> int | None:
        """Dense training peak minus this scheme's training peak."""
        if self.dense_training_bytes is None:
            return None
        return self.dense_training_bytes - self.training_peak_bytes

    @property
    def held_bytes(self) -> int:
        return sum(row.held_bytes for row in self.layers)

    def layer(self, name: str) -> LayerMemory:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in the memory report of {self.model_name!r}")

    def largest(self, n: int = 5) -> list:
        """The ``n`` layers holding the most memory through the step (``held_bytes``).

            [row.name for row in report.largest(3)]
        """
        rows = [r for r in self.layers if r.held_bytes > 0]
        return sorted(rows, key=lambda r: (-r.held_bytes, r.name))[:n]

    def summary(self) -> str:
        """A few lines: the labels, the peak and where it is, dense vs sparse."""
        lines = [
            f"model {self.model_name}, scheme {self.scheme_name!r}, input "
            f"{'x'.join(str(d) for d in self.input_shape)}, batch 1, int8",
            f"extra memory (Lin et al. label): {self.extra_memory_kb:.1f} KB",
            f"inference peak (forward only):   {kb(self.forward_peak_bytes)}",
            f"training step peak:              {kb(self.training_peak_bytes)} "
            f"({self.peak_phase} pass at {self.peak_layer}: "
            + ", ".join(f"{k} {kb(v)}" for k, v in self.peak_breakdown.items() if v) + ")",
        ]
        if self.arena_bytes is not None:
            lines.append(f"TFLM arena (structs included):   {kb(self.arena_bytes)} "
                         f"(+{kb(self.runtime_bytes)} TFLM structs, op data, alignment)")
        if self.dense_training_bytes is not None:
            saving = self.saving_bytes
            lines.append(f"dense (full) training peak:      {kb(self.dense_training_bytes)} "
                         f"(this scheme saves {kb(saving)}, "
                         f"{100 * saving / self.dense_training_bytes:.1f}%)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def table(self, all_layers: bool = False) -> str:
        """Per-layer breakdown in KB (updated layers and the peak layer unless ``all_layers``).

            print(report.table())
        """
        columns = ("layer", "update", "output", "act", "saved", "mask", "weights", "bias",
                   "opt", "fwd live", "bwd live", "Lin")
        rows = []
        for r in self.layers:
            if not (all_layers or r.held_bytes or r.extra_memory_bits
                    or r.name == self.peak_layer):
                continue
            rows.append((r.name, r.update, "x".join(str(d) for d in r.output_shape),
                         _k(r.activation_bytes), _k(r.saved_input_bytes), _k(r.mask_bytes),
                         _k(r.weight_bytes), _k(r.bias_bytes), _k(r.optimizer_bytes),
                         _k(r.forward_live_bytes), _k(r.backward_live_bytes),
                         _k(r.extra_memory_bits / 8)))
        widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
                  for i, c in enumerate(columns)]
        def fmt(row):
            return "  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(row, widths)))
        lines = ["KB per layer (act: output buffer; saved/mask/weights/bias/opt: held for "
                 "the step; fwd/bwd live: all SRAM while it runs)",
                 fmt(columns), fmt(["-" * w for w in widths])]
        lines += [fmt(row) for row in rows]
        return "\n".join(lines) + "\n" + self.summary()

    def to_dict(self) -> dict:
        payload = dataclasses.asdict(self)
        payload.update(extra_memory_bytes=self.extra_memory_bytes,
                       extra_memory_kb=self.extra_memory_kb, saving_bytes=self.saving_bytes)
        return payload


def kb(n_bytes) -> str:
    """``"12.3 KB"``."""
    return f"{n_bytes / KB:.1f} KB"


def _k(n_bytes) -> str:
    return f"{n_bytes / KB:.1f}" if n_bytes else "-"




_PARTS = (("saved_input_bytes", "saved input (kept channels)", "#4c72b0"),
          ("mask_bytes", "1-bit masks", "#dd8452"),
          ("weight_bytes", "updated weights (int8)", "#55a868"),
          ("bias_bytes", "updated biases (int32)", "#c44e52"),
          ("optimizer_bytes", "optimizer state", "#8172b3"))
_WHAT = {"forward_peak": "forward_peak_bytes", "training_peak": "training_peak_bytes",
         "arena": "arena_bytes"}


def plot_memory(report: MemoryReport, path, title: str | None = None) -> str:
    """Write a PNG: per layer, what it holds (stacked) and all SRAM live while it runs
    forward / backward; beside it, the scheme's peaks against dense training.

        plot_memory(report, "benchmarks/results/memory_49kb.png")
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plot_memory needs matplotlib: pip install 'dgst-tf[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, side) = plt.subplots(1, 2, figsize=(15, 5.5),
                                   gridspec_kw={"width_ratios": [4, 1]})
    _plot_layers(ax, report)
    ax.set_title(title or f"{report.model_name}, scheme {report.scheme_name!r}, "
                 f"input {'x'.join(map(str, report.input_shape))}, batch 1, int8")
    _plot_totals(side, report)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    path = os.fspath(path)
    write_atomically(path, png.getvalue(), make_parents=True)
    return path


def _plot_layers(ax, report: MemoryReport) -> None:
    """Per layer: what it holds (stacked bars) and all SRAM live while it runs (lines)."""
    rows = report.layers
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for attr, label, color in _PARTS:
        values = [getattr(r, attr) / KB for r in rows]
        if any(values):
            ax.bar(x, values, bottom=bottom, label=label, color=color, width=0.8)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("held through the step (KB)")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=6)
    live = ax.twinx()
    live.plot(list(x), [r.forward_live_bytes / KB for r in rows], color="black", lw=1,
              label="SRAM live, forward")
    live.plot(list(x), [r.backward_live_bytes / KB if r.backward_live_bytes else None
                        for r in rows], color="grey", lw=1, ls="--",
              label="SRAM live, backward")
    live.axhline(report.training_peak_bytes / KB, color="red", lw=0.8, ls=":",
                 label=f"training peak {report.training_peak_bytes / KB:.0f} KB")
    live.set_ylabel("SRAM in use while the layer runs (KB)")
    live.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    more = live.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper left")


def _plot_totals(side, report: MemoryReport) -> None:
    """The scheme's label and peaks beside dense training."""
    labels = ["Lin extra\nmemory", "inference\npeak", "training\npeak"]
    values = [report.extra_memory_bytes, report.forward_peak_bytes, report.training_peak_bytes]
    colors = ["#4c72b0", "#999999", "#c44e52"]
    if report.dense_training_bytes is not None:
        labels.append("dense\ntraining")
        values.append(report.dense_training_bytes)
        colors.append("#333333")
    side.bar(range(len(values)), [v / KB for v in values], color=colors)
    for i, v in enumerate(values):
        side.text(i, v / KB, f"{v / KB:.0f}", ha="center", va="bottom", fontsize=8)
    side.set_xticks(range(len(values)))
    side.set_xticklabels(labels, fontsize=8)
    side.set_ylabel("KB")
    side.set_title("sparse vs dense")


def compare_with_tflm(report: MemoryReport, tflm_arena_bytes: int,
                      what: str = "forward_peak", verbose: bool = True) -> dict:
    """Predicted vs TFLM's arena (``print_allocations`` of the exported model).

    ``what``: "forward_peak" for an inference graph, "training_peak" for the tensors of
    the exported training step, "arena" for its whole arena (TFLM's structs included: the
    figure ``print_allocations`` totals). Returns ``{"predicted_bytes",
    "tflm_arena_bytes", "difference_bytes" (TFLM - predicted), "ratio" (TFLM /
    predicted)}`` and prints one line if ``verbose``.

        compare_with_tflm(report, 245_760)   # TFLM 240.0 KB vs predicted 240.0 KB: +0.0 KB
    """
    if what not in _WHAT:
        raise ValueError(f"what must be one of {sorted(_WHAT)}, got {what!r}")
    arena = int(tflm_arena_bytes)
    if arena <= 0:
        raise ValueError(f"tflm_arena_bytes must be positive, got {tflm_arena_bytes!r}")
    predicted = getattr(report, _WHAT[what])
    if predicted is None:
        raise ValueError(f"the report of {report.scheme_name!r} has no {what} figure")
    predicted = int(predicted)
    result = {"what": what, "predicted_bytes": predicted, "tflm_arena_bytes": arena,
              "difference_bytes": arena - predicted, "ratio": arena / predicted}
    if verbose:
        print(f"{what}: TFLM arena {arena / KB:.1f} KB vs predicted {predicted / KB:.1f} KB: "
              f"{(arena - predicted) / KB:+.1f} KB ({100 * (arena / predicted - 1):+.1f}%)")
    return result


__all__ = ["KB", "LayerMemory", "MemoryReport", "compare_with_tflm", "kb", "plot_memory"]
