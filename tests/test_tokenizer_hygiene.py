"""Tokenizer hygiene for log-likelihoods: pad must never be eos, padding goes left, and the response's eos counts."""

from __future__ import annotations

import copy

import pytest
import torch

from replugchar.core.data import Example
from replugchar.lm.likelihood import LMLikelihood, LoglikRequest, fix_tokenizer

WORDS = [
    "hello",
    "world",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "User:",
    "Character:",
    "Character",
    "trait:",
]


def llama_style_tokenizer(*, pad_token: str | None = "</s>"):
    """Word-level tokenizer laid out like Llama-2: <unk>=0, <s>=1, </s>=2, and pad set to eos (or unset)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def byte_tokenizer_without_unk(*, with_eos: bool = True):
    """Byte-level BPE (no merges) with <s> and </s> but no unk; pad = eos, as in SmolLM2-style tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    if with_eos:
        fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"})
    return fast


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def test_pad_becomes_unk_when_pad_equals_eos():
    tok = llama_style_tokenizer()
    model = tiny_gpt2(len(tok))
    assert tok.pad_token_id == tok.eos_token_id == 2  # the broken starting point
    n_vocab = len(tok)

    assert fix_tokenizer(tok, model) is tok
    assert tok.pad_token == "<unk>" and tok.pad_token_id == tok.unk_token_id == 0
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == n_vocab  # nothing added: no resize needed
    assert model.get_input_embeddings().num_embeddings == n_vocab
    assert model.config.pad_token_id == 0
    assert tok.padding_side == "left"


def test_missing_pad_becomes_unk():
    tok = llama_style_tokenizer(pad_token=None)
    assert tok.pad_token_id is None
    fix_tokenizer(tok)
    assert tok.pad_token_id == tok.unk_token_id == 0
    assert tok.padding_side == "left"


def test_without_unk_a_special_unnormalised_pad_is_added_and_embeddings_resized():
    tok = byte_tokenizer_without_unk()
    assert tok.unk_token_id is None and tok.pad_token_id == tok.eos_token_id
    model = tiny_gpt2(len(tok))
    n_vocab = len(tok)

    fix_tokenizer(tok, model)
    pad_id = tok.pad_token_id
    assert len(tok) == n_vocab + 1 and pad_id == n_vocab
    assert pad_id != tok.eos_token_id
    added = tok.added_tokens_decoder[pad_id]
    assert added.content == tok.pad_token
    assert added.special is True
    assert added.normalized is False
    assert tok("a" + tok.pad_token, add_special_tokens=False).input_ids[-1] == pad_id  # one token, not bytes
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == pad_id
    assert tok.padding_side == "left"
    with torch.no_grad():  # the model accepts the new id
        out = model(input_ids=torch.tensor([[5, pad_id]])).logits
    assert out.shape == (1, 2, len(tok))


def test_fix_tokenizer_raises_without_eos():
    tok = byte_tokenizer_without_unk(with_eos=False)
    assert tok.eos_token_id is None
    with pytest.raises(ValueError, match="eos"):
        fix_tokenizer(tok)


def test_naive_pad_mask_drops_the_eos_when_pad_equals_eos():
    tok = llama_style_tokenizer()
    seq = [*tok("hello world", add_special_tokens=False).input_ids, tok.eos_token_id]
    width = len(seq) + 2

    def left_padded(pad_id: int) -> torch.Tensor:
        return torch.tensor([pad_id] * (width - len(seq)) + seq)

    broken = left_padded(tok.pad_token_id)
    naive = broken != tok.pad_token_id
    assert not naive[-1]  # the eos that ends the response is hidden with the padding
    assert int(naive.sum()) == len(seq) - 1

    fix_tokenizer(tok)
    fixed = left_padded(tok.pad_token_id)
    mask = fixed != tok.pad_token_id
    assert mask[-1] and int(mask.sum()) == len(seq)
    assert fixed[-1].item() == tok.eos_token_id


@pytest.fixture(scope="module")
def request_():
    ex = Example("ex-eos", "c", "d", "Hello! How are you?", "Fine, thanks. And you?")
    return LoglikRequest(ex, ("I am a cheerful baker.",))


def test_encode_ends_with_eos_and_counts_it_as_a_response_token(tiny_lm, request_):
    model, tok = tiny_lm
    likelihood = LMLikelihood(model, tok)
    ids, n_response = likelihood.encode(request_)
    response_ids = tok(" " + request_.example.response, add_special_tokens=False).input_ids
    assert ids[-1] == tok.eos_token_id
    assert n_response == len(response_ids) + 1
    assert ids[-n_response:] == [*response_ids, tok.eos_token_id]
    assert likelihood.loglik([request_]).n_tokens.tolist() == [n_response]


def test_loglik_includes_the_eos_log_probability(tiny_lm, request_):
    model, tok = tiny_lm
    before = LMLikelihood(model, tok).loglik([request_]).logp_sum[0]

    # Same LM, but the eos logit is lowered by D at every position (a bias on the output layer)
    shift = 30.0
    edited = copy.deepcopy(model)
    old = edited.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = -shift
    edited.lm_head = head.requires_grad_(False)
    after = LMLikelihood(edited, tok).loglik([request_]).logp_sum[0]

    # log P(eos | response) drops by ~D; the other tokens gain at most log(1 / (1 - P(eos))) each (tiny).
    # If the eos were not scored the score would *rise* slightly instead.
    assert before - after == pytest.approx(shift, abs=0.5)


def test_likelihood_on_fixed_llama_style_tokenizer_counts_eos_in_a_padded_batch():
    tok = llama_style_tokenizer()
    model = tiny_gpt2(len(tok))
    fix_tokenizer(tok, model)
    likelihood = LMLikelihood(model, tok, max_batch_tokens=4096)
    short = LoglikRequest(Example("a", "c", "d", "hello", "fine"), ("how are you",))
    long = LoglikRequest(Example("b", "c", "d", "how are you", "fine thanks how are you"), ())
    batched = likelihood.loglik([short, long])
    assert likelihood.forward_passes == 1  # one padded batch
    assert batched.n_tokens.tolist() == [2, 6]  # response words + eos
    one_by_one = [likelihood.loglik([r]).logp_sum[0] for r in (short, long)]
    assert batched.logp_sum.tolist() == pytest.approx(one_by_one, abs=1e-4)
