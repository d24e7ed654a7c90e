"""fedsim: federated-learning simulation on Flower and Ray, with PFNM matching."""

__version__ = "0.1.0"
