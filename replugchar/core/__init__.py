"""The core: the data schema and loaders, the one retrieval scoring rule, atomic writes. No Lightning, no LM."""
