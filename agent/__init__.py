"""Device side of edgeshift: loads a portfolio and serves its variants, switching between them live.

Runs on Raspberry Pis and Jetsons: numpy, onnxruntime, psutil, paho-mqtt only, never torch.
This package import stays light; submodules import their heavy dependencies themselves.
"""

__version__ = "0.1.0"
