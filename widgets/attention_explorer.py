"""`AttentionExplorer`: one captured run, layer by layer and head by head.

Notable:
- It holds a capture (`pixelrefer.analysis.capture_attention` with
  `key_layers`, and `pooled_layers` for the Fig. 3 map) and the encoded
  batch it was captured on, never a model: moving the layer slider or the
  head selector is `attention_view(...)` on stored statistics plus a redraw.
- Four panels per layer (widgets.figures): the group-to-group matrix, the
  pooled map, the query tokens' attention on the image grid, and on each
  object's tokens. The figure is a PNG in an `ipywidgets.Image`, rendered
  once per (layer, head) and cached; a text readout states the numbers.
- The layer slider is a `SelectionSlider` over the captured layers, so a
  capture of layers (0, 7, 14, 27) slides over exactly those.
"""

from __future__ import annotations

import ipywidgets as w
import numpy as np

from pixelrefer.analysis.attention import AttentionCapture
from pixelrefer.analysis.attention_view import AttentionView, attention_view
from pixelrefer.errors import InputError
from pixelrefer.processing import EncodedBatch
from widgets.figures import figure_png, plot_attention_view

MEAN = -1  # the head selector's value for "mean over heads" (a Dropdown shows None as no selection)


class AttentionExplorer(w.VBox):
    """Layer slider, head selector and the four attention panels of one captured sample.

    Args:
        capture: an `AttentionCapture` whose `key_layers` cover the layers to explore.
        encoded: the `EncodedBatch` the capture ran on (its spans place tokens on the image and objects).
        image: the picture, drawn under the image-grid panel.
        query: the query group (default "answer": the answer tokens of a teacher-forced prompt).
        sample: which sample of the batch.
        object_names: legend names of the objects (default `<object0>`, …).
    """

    def __init__(self, capture: AttentionCapture, encoded: EncodedBatch, image=None, *, query: str = "answer",
                 sample: int = 0, object_names: list[str] | None = None):
        self.layers = sorted(set(capture.key_mass) & set(capture.mass))
        if not self.layers:
            raise InputError("the capture kept no per-key attention: pass key_layers=… to capture_attention")
        self.capture, self.encoded, self.query, self.sample = capture, encoded, query, sample
        self.image = None if image is None else np.asarray(image)
        self.object_names = object_names
        self.heads = capture.mass[self.layers[0]].shape[1]
        self.view: AttentionView | None = None
        self._pngs: dict[tuple[int, int | None], bytes] = {}
        self._moving = False  # set while `show` moves both controls: one render, not two

        self._layer = w.SelectionSlider(options=self.layers, value=self.layers[0], description="layer",
                                        continuous_update=False)
        self._head = w.Dropdown(options=[("mean over heads", MEAN)] + [(f"head {h}", h) for h in range(self.heads)],
                                description="head")
        self._readout = w.HTML()
        self._figure = w.Image(format="png", layout=w.Layout(max_width="100%", align_self="flex-start"))
        self._layer.observe(self._on_control, "value")
        self._head.observe(self._on_control, "value")
        super().__init__([w.HBox([self._layer, self._head]), self._readout, self._figure])
        self.add_class("pixelrefer-attention-explorer")
        self._render()

    def show(self, layer: int, head: int | None = None) -> AttentionView:
        """Switch to `layer` and `head` (None: mean over heads), as the controls do; returns the view."""
        if layer not in self.layers:
            raise InputError(f"layer {layer} was not captured with key_layers; explorable: {self.layers}")
        if head is not None and not 0 <= head < self.heads:
            raise InputError(f"head {head} is out of range: the model has {self.heads} heads")
        self._moving = True
        try:
            self._head.value, self._layer.value = MEAN if head is None else head, layer
        finally:
            self._moving = False
        self._render()
        return self.view

    @property
    def figure_png(self) -> bytes:
        """The PNG currently shown."""
        return bytes(self._figure.value)

    def _on_control(self, _change) -> None:
        if not self._moving:
            self._render()

    def _render(self) -> None:
        layer, head = self._layer.value, None if self._head.value == MEAN else self._head.value
        if self.view is not None and (self.view.layer, self.view.head) == (layer, head):
            return
        self.view = attention_view(self.capture, self.encoded, layer, head=head, query=self.query,
                                   sample=self.sample)
        if (layer, head) not in self._pngs:
            fig = plot_attention_view(self.view, self.image, self.encoded.spans[self.sample], self.capture.pool,
                                      self.object_names)
            self._pngs[layer, head] = figure_png(fig)
        self._figure.value = self._pngs[layer, head]
        shares = " · ".join(f"{name} {share:.3f}" for name, share in self.view.to_groups.items())
        heads = "mean over heads" if head is None else f"head {head}"
        self._readout.value = (f"<span class='pixelrefer-readout'>layer {layer} of {self.layers[-1]} · {heads} · "
                               f"{self.query} → {shares}</span>")
