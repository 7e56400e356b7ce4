"""Models: the backbone component and its typed settings, pooling, losses, GradCache, prompts and collators, the
LightningModules (retriever, reranker, CLIP baseline) and the one checkpoint loader."""
