"""lamra-pl: LMM universal retrievers and rerankers (LamRA, MM-Embed) on PyTorch Lightning."""

__version__ = "0.1.0"
