"""The frozen LM: model loading, tokenizer hygiene and log-likelihoods, the log-likelihood cache, the gain table. No Lightning."""
