"""ipywidgets front-ends for the pixelrefer workbench.

    RegionPicker(image, masks=None, refine=None)   brush / box / points → masks (arrays, COCO RLE, files)
    AttentionExplorer(capture, encoded, image)     layer slider, head selector, four attention panels
    SimilarityViewer(object_outputs, names)        Fig. 7 matrices, per object

Widgets hold no model and no analysis: numbers come from `pixelrefer.analysis`,
masks from `pixelrefer.regions` / `pixelrefer.data.mask_files`. The drawing
canvas is ipycanvas, whose JupyterLab 4 extension ships in its pip package,
so it works offline with no build step.
"""

from widgets.attention_explorer import AttentionExplorer
from widgets.region_picker import PickedObject, RegionPicker
from widgets.similarity_viewer import SimilarityViewer

__all__ = ["AttentionExplorer", "PickedObject", "RegionPicker", "SimilarityViewer"]
