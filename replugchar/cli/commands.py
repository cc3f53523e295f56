"""The command table: ``replugchar --help`` and each tool's ``--help`` read it (one list of commands)."""

from __future__ import annotations

COMMANDS = {
    "fit": "LSR training from a YAML config (LightningCLI; every option in --help and the YAML)",
    "validate": "validation metrics of a checkpoint (--config ... --ckpt_path ...)",
    "score": "precompute frozen-LM scores of a data set into the persistent cache",
    "priors": "generality priors (lm-utility | judge | import) and fit-weight (dialogue scale, λ, threshold)",
    "index": "rebuild the FAISS index (encoder and/or priors changed); flat, ivf or hnsw",
    "export": "export encoder + index + scoring rule as one folder for other RAG stacks",
    "retrieve": "print a character's top settings for a query (and optional history)",
    "add-characters": "add characters (characters.jsonl) to an export folder: embedded, with its learned generality",
    "evaluate": "compare retrievers on held-out characters by the frozen LM's likelihood of gold replies",
    "chat": "talk to a character: retrieved settings (score, similarity, prior) and the LM's reply",
    "finetune-lm": "fine-tune the character LM (pad/eos-safe SFT, full or LoRA) to use as the frozen teacher",
    "teacher-report": "how well an LM separates settings: margins, oracle gap, agreement with similarity",
}
