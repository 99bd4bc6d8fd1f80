"""`SimilarityViewer`: an object's token similarity before and after aggregation (paper Fig. 7), per object.

Notable:
- Numbers come from `pixelrefer.analysis.object_similarity` on a forward
  pass's `object_outputs`, the figure from `pixelrefer.visualize.plot_similarity`;
  the viewer only picks the object. Each object is computed once, on first view.
- An object with no more foreground cells than n keeps its cells as tokens,
  so its two matrices are alike; the readout says so.
"""

from __future__ import annotations

import ipywidgets as w

from pixelrefer.analysis.similarity import ObjectSimilarity, object_similarity
from pixelrefer.errors import InputError
from pixelrefer.modeling.pixelrefer import ObjectFeatures
from pixelrefer.visualize import plot_similarity
from widgets.figures import figure_png


class SimilarityViewer(w.VBox):
    """An object selector and Fig. 7's two similarity matrices for the selected object.

    Args:
        objects: `outputs.object_outputs` of a forward pass (one row per object unit).
        names: display names of the objects (default `<object0>`, …).
        max_cells: cells shown before aggregation (Fig. 7 samples 50), chosen with `seed`.
    """

    def __init__(self, objects: ObjectFeatures, names: list[str] | None = None, *, max_cells: int | None = 50,
                 seed: int = 0):
        if objects is None or objects.aggregated is None:
            raise InputError("SimilarityViewer needs `object_outputs` with aggregation intermediates (a SAOT model)")
        count = objects.aggregated.features.shape[0]
        self.names = list(names) if names is not None else [f"<object{k}>" for k in range(count)]
        if len(self.names) != count:
            raise InputError(f"{len(self.names)} names for {count} objects")
        self.objects, self.max_cells, self.seed = objects, max_cells, seed
        self.num_tokens = objects.aggregated.features.shape[1]
        self._cache: dict[int, tuple[ObjectSimilarity, bytes]] = {}
        self._selector = w.Dropdown(options=[(name, k) for k, name in enumerate(self.names)], description="object")
        self._readout = w.HTML()
        self._figure = w.Image(format="png", layout=w.Layout(max_width="100%", align_self="flex-start"))
        self._selector.observe(lambda change: self._draw(change.new), "value")
        super().__init__([self._selector, self._readout, self._figure])
        self.add_class("pixelrefer-similarity-viewer")
        self.show(0)

    def similarity(self, index: int) -> ObjectSimilarity:
        """Object `index`'s similarity matrices (computed on first use)."""
        if not 0 <= index < len(self.names):
            raise InputError(f"no object {index}: the viewer has {len(self.names)}")
        if index not in self._cache:
            sim = object_similarity(self.objects, index, max_cells=self.max_cells, seed=self.seed)
            title = f"{self.names[index]}: {sim.cells} cells → {sim.after.shape[0]} tokens"
            self._cache[index] = sim, figure_png(plot_similarity(sim.before, sim.after, title))
        return self._cache[index][0]

    def show(self, index: int) -> ObjectSimilarity:
        """Select object `index`, as the dropdown does."""
        sim = self.similarity(index)
        if self._selector.value != index:
            self._selector.value = index  # the observer draws
        else:
            self._draw(index)
        return sim

    def _draw(self, index: int) -> None:
        sim = self.similarity(index)
        self._figure.value = self._cache[index][1]
        note = "" if sim.cells > self.num_tokens else f" (no more cells than n = {self.num_tokens}: tokens are the cells)"
        self._readout.value = (f"{self.names[index]}: mean off-diagonal similarity {sim.mean_before:.3f} before → "
                               f"{sim.mean_after:.3f} after aggregation{note}")

    @property
    def figure_png(self) -> bytes:
        return bytes(self._figure.value)
