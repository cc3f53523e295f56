"""The frozen LM: model loading, tokenizer hygiene and scoring, the score cache, the gain table. No Lightning."""
