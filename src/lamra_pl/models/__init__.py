"""Models: backbone loading, prompts and collation, the LightningModules, and checkpoint tools."""
