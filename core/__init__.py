"""EnergyLens engine: robust classifiers seen as energy-based models.

The engine never imports streamlit; every module is usable from the CLI and from notebooks.
Images are float tensors N x C x H x W in [0, 1]; any input normalisation lives inside the model.
"""

__version__ = "0.1.0"
