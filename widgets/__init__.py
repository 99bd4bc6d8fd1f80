"""ipywidgets front-ends for the pixelrefer workbench.

`RegionPicker`, `AttentionExplorer` and `SimilarityViewer` come with the
widgets issue; this package is a placeholder until then and holds no code.
"""
