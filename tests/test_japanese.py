"""The Japanese (RealPersonaChat) path end to end with the byte-level tiny models.

An in-code Japanese corpus in the shared schema (4 characters x 10 settings x 6 examples) goes through every
stage: loading, LM scoring with the Japanese template of configs/ja_example.yaml, a short LSR fit whose
candidates come from the FAISS index (k=5 < 10 settings), export, ``Retriever.search`` with a Japanese query and
``replugchar.evaluation.evaluate.evaluate`` (all eight methods, BM25 included). A slow test repeats fit + export + retrieval
on a small subset of ../shared/data/real_persona_chat when that folder exists.
"""

from __future__ import annotations

import json
import math
import pathlib
import types
from collections import defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from replugchar.core.data import Corpus, SplitSpec, split_characters
from replugchar.evaluation import metrics as ev
from replugchar.evaluation.evaluate import evaluate
from replugchar.lm.likelihood import NO_SETTING, LMLikelihood, LoglikRequest, PromptTemplate
from replugchar.lm.loglik_cache import LikelihoodOptions
from replugchar.retrieval.export import export_retriever
from replugchar.retrieval.index import SettingIndex
from replugchar.retrieval.retriever import Retriever
from replugchar.training.datamodule import LSRDataModule
from replugchar.training.module import LSRModule
from replugchar.training.optim import OptimizerOptions

REPO = Path(__file__).resolve().parents[1]
JA_CONFIG = REPO / "configs" / "ja_example.yaml"
RPC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_persona_chat"
VAL_FRACTION = 0.25
K = 5

# ----------------------------------------------------------------------------------------------- corpus
# Text deliberately mixes kanji/kana with half-width katakana (ｶﾒﾗ), full-width Latin (ＳＦ), an ideographic
# space, the corpus's masks (＊＊, <AA>), a 4-byte emoji and a decomposed (NFD) が: none of it may be normalised.
SETTINGS = {
    "ja-A": (
        "私はパン屋で働いていて、毎朝四時に起きる。",
        "猫を二匹飼っていて、名前はミソとトーフだ。",
        "休日はよく近所の公園を散歩する。",
        "甘いものが大好きで、特にメロンパンに目がない。",
        "北海道の小さな町で生まれ育った。",
        "誰とでもすぐに打ち解ける明るい性格だ。",
        "最近ｶﾒﾗを始めて、週末は写真を撮りに行く。",
        "英語は少し苦手だが、勉強中である。",
        "兄が一人いて、東京で働いている。",
        "将来は自分の店を持ちたいと思っている。",
    ),
    "ja-B": (
        "看護師として夜勤の多い病院で働いている。",
        "人見知りだが、話し始めると止まらない。",
        "コーヒーは一日に三杯以上飲む。",
        "趣味はギターで、学生時代はバンドを組んでいた。",
        "寒いのが苦手で、冬はほとんど外に出ない。",
        "大阪出身で、関西弁が抜けない。",
        "休みの日は一日中ゲームをしていることが多い。",
        "最近、料理教室に通い始めた。",
        "犬を飼うのが夢である。",
        "健康のために\u3000毎晩ストレッチをしている。",
    ),
    "ja-C": (
        "大学で天文学を勉強している学生だ。",
        "星を見るのが好きで、よく山へ行く。",
        "バイオリンを十年以上続けている。",
        "好きな食べ物は餃子である。",
        "雪を一度も見たことがない。",
        "三か国語を話すことができる。",
        "アルバイトでは塾の講師をしている。",
        "朝は弱く、いつもギリギリに起きる。",
        "ＳＦ小説を月に五冊は読む。",
        "一人暮らしを始めて二年になる。",
    ),
    "ja-D": (
        "定年退職した元船乗りである。",
        "古い地図を集めるのが趣味だ。",
        "大きな音楽は苦手で、静かな場所を好む。",
        "孫が三人いて、みんな可愛い。",
        "毎朝、海沿いを散歩する。",
        "若い頃は世界中の港を訪れた。",
        "釣りが得意で、よく魚をさばく。",
        "日本酒が好きだが、飲みすぎないようにしている。",
        "俳句を詠むのが最近の楽しみだ。",
        "＊＊県の港町に住んでいる。",
    ),
}
# per character: two dialogues of three (query, response, query_type) exchanges
DIALOGUES = {
    "ja-A": (
        (
            ("こんにちは！", "こんにちは！よろしくお願いします😊", "greeting"),
            ("お仕事は何をされていますか？", "パン屋で働いていて、毎朝とても早起きなんです。", "other"),
            ("ペットは飼っていますか？", "猫を二匹飼っています。ミソとトーフです。", "other"),
        ),
        (
            (
                "はじめまして、よろしくお願いします。",
                "はじめまして！こちらこそよろしくお願いします。",
                "greeting",
            ),
            ("甘いものはお好きですか？", "大好きです！特にメロンパンには目がないです。", "other"),
            ("今日はありがとうございました。", "こちらこそ、楽しかったです。またね！", "closing"),
        ),
    ),
    "ja-B": (
        (
            ("こんばんは！", "こんばんは。夜勤明けなので少し眠いです。", "greeting"),
            ("コーヒーは飲みますか？", "毎日三杯は飲んでますね。", "other"),
            ("休日は何をしていますか？", "家でずっとゲームしてます。", "other"),
        ),
        (
            ("こんにちは！", "あ、<AA>さん、こんにちは。よろしくお願いします。", "greeting"),
            ("どちらのご出身ですか？", "大阪です。関西弁が抜けへんのですわ。", "other"),
            ("お話しできて楽しかったです。失礼します。", "ありがとうございました、お疲れ様です。", "closing"),
        ),
    ),
    "ja-C": (
        (
            ("こんにちは！", "こんにちは！大学生です、よろしくお願いします。", "greeting"),
            ("何を勉強していますか？", "天文学です。星を見るのか\u3099好きで。", "other"),
            ("好きな食べ物は？", "餃子ですね、毎週食べてます。", "other"),
        ),
        (
            ("おはようございます。", "おはようございます…朝は弱いんです。", "greeting"),
            ("楽器は何か弾けますか？", "バイオリンを十年以上続けています。", "other"),
            ("冬は好きですか？", "実は雪を一度も見たことがないんです。", "other"),
        ),
    ),
    "ja-D": (
        (
            ("こんにちは！", "やあ、こんにちは。元船乗りのじいさんですよ。", "greeting"),
            ("ご趣味は何ですか？", "古い地図を集めとります。", "other"),
            ("お孫さんはいますか？", "三人おって、みんな可愛いもんです。", "other"),
        ),
        (
            ("よろしくお願いします。", "こちらこそ、よろしく頼みます。", "greeting"),
            ("お酒は飲まれますか？", "日本酒が好きでね、ほどほどにしとります。", "other"),
            ("ありがとうございました。おやすみなさい。", "おやすみなさい、良い夢を。", "closing"),
        ),
    ),
}


def corpus_records() -> tuple[list[dict], list[dict]]:
    """(characters, dialogues) records in the shared schema; context = up to 4 earlier turns, oldest first."""
    characters = [
        {
            "character_id": cid,
            "source": "real_persona_chat",
            "name": None,
            "language": "ja",
            "settings": list(settings),
            "attributes": {"demographic_information": {"age": "20-29"}},
        }
        for cid, settings in SETTINGS.items()
    ]
    dialogues = []
    for c, (cid, sessions) in enumerate(DIALOGUES.items()):
        for d, exchanges in enumerate(sessions):
            dialogue_id = f"rpc-ja{c}{d}"
            turns: list[dict] = []
            for j, (query, response, query_type) in enumerate(exchanges):
                turn_index = 2 * j + 1
                dialogues.append(
                    {
                        "example_id": f"{dialogue_id}-t{turn_index:02d}",
                        "character_id": cid,
                        "dialogue_id": dialogue_id,
                        "turn_index": turn_index,
                        "context": turns[-4:],
                        "query": query,
                        "response": response,
                        "query_type": query_type,
                    }
                )
                turns = [*turns, {"role": "user", "text": query}, {"role": "character", "text": response}]
    return characters, dialogues


def write_jsonl(path: Path, rows: list[dict]) -> None:
    # like the shared data: compact, UTF-8, non-ASCII written as is
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows),
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def ja_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ja-data")
    characters, dialogues = corpus_records()
    write_jsonl(folder / "characters.jsonl", characters)
    write_jsonl(folder / "dialogues.jsonl", dialogues)
    return folder


@pytest.fixture(scope="module")
def ja_template() -> PromptTemplate:
    cfg = yaml.safe_load(JA_CONFIG.read_text(encoding="utf-8"))
    return PromptTemplate(**cfg["model"]["template"])


def the_split(character_ids) -> tuple[set[str], set[str]]:
    """The character split LSRDataModule / evaluate make with VAL_FRACTION and the default seed 0."""
    split = split_characters(list(character_ids), VAL_FRACTION, 0)
    return split["train"], split["val"]


# ----------------------------------------------------------------------------------------------- (a) loading
def test_corpus_load_round_trips_japanese_text_exactly(ja_dir):
    characters, dialogues = corpus_records()
    corpus = Corpus.load(ja_dir)

    assert list(corpus.characters) == [c["character_id"] for c in characters]
    for rec in characters:
        char = corpus.characters[rec["character_id"]]
        assert char.language == "ja"
        assert char.name is None
        assert char.settings == tuple(rec["settings"])  # verbatim: no NFKC, no whitespace folding
    assert "最近ｶﾒﾗを始めて、週末は写真を撮りに行く。" in corpus.characters["ja-A"].settings
    assert "健康のために\u3000毎晩ストレッチをしている。" in corpus.characters["ja-B"].settings

    assert len(corpus.examples) == len(dialogues) == 24
    for ex, rec in zip(corpus.examples, dialogues):
        assert ex.example_id == rec["example_id"]
        assert ex.character_id == rec["character_id"]
        assert ex.dialogue_id == rec["dialogue_id"]
        assert ex.query == rec["query"]
        assert ex.response == rec["response"]
        assert ex.query_type == rec["query_type"]
        assert [(t.role, t.text) for t in ex.context] == [(t["role"], t["text"]) for t in rec["context"]]
    by_id = {e.example_id: e for e in corpus.examples}
    assert by_id["rpc-ja00-t01"].response.endswith("😊")
    assert "\u304b\u3099" in by_id["rpc-ja20-t03"].response  # NFD が kept decomposed
    assert sum(e.query_type == "greeting" for e in corpus.examples) == 8
    assert sum(e.query == "こんにちは！" for e in corpus.examples) == 4

    # the Arrow view keeps the text too
    ds = corpus.to_dataset()
    assert ds[0]["query"] == "こんにちは！" and ds[0]["settings"] == list(SETTINGS["ja-A"])


# ----------------------------------------------------------------------------------------------- (b) LM scoring
def test_lm_likelihood_encodes_japanese_byte_level_and_is_finite(tiny_lm, ja_dir, ja_template):
    model, tok = tiny_lm
    corpus = Corpus.load(ja_dir)
    likelihood = LMLikelihood(model, tok, ja_template, max_length=512)
    ex = next(e for e in corpus.examples if e.example_id == "rpc-ja00-t05")  # 4 context turns
    setting = corpus.characters[ex.character_id].settings[1]
    request = LoglikRequest(ex, (setting,))

    prompt = ja_template.render((setting,), ex.context, ex.query)
    assert prompt.startswith(f"人物設定: {setting}\n")
    assert "相手: こんにちは！\n本人: こんにちは！よろしくお願いします😊\n" in prompt
    assert prompt.endswith(f"相手: {ex.query}\n本人:")
    assert "人物設定:" not in ja_template.render(NO_SETTING, ex.context, ex.query)

    ids, n_resp = likelihood.encode(request)
    response = ja_template.response.format(text=ex.response)  # " <response>"
    # byte level: one token per UTF-8 byte (3 per kana/kanji, 4 for the emoji), nothing unknown ...
    assert len(ids) - n_resp == len(prompt.encode("utf-8"))
    assert n_resp == len(response.encode("utf-8")) + 1  # ... and the eos that ends the reply is scored
    assert ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids[:-1]) == prompt + response  # lossless round trip of the Japanese text

    # the score is the LM's log-likelihood of exactly those tokens, eos included
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    per_token = [float(logp[t - 1, ids[t]]) for t in range(len(ids) - n_resp, len(ids))]
    scores = likelihood.loglik([request])
    assert scores.n_tokens[0] == n_resp
    assert scores.logp_sum[0] == pytest.approx(sum(per_token), abs=1e-3)
    assert scores.logp_sum[0] != pytest.approx(sum(per_token[:-1]), abs=1e-3)  # the eos term is in the sum

    # a batch of Japanese requests of different lengths (left padding) gives the one-by-one scores
    requests = [
        LoglikRequest(e, (corpus.characters[e.character_id].settings[i % 10],))
        for i, e in enumerate(corpus.examples)
    ]
    requests += [LoglikRequest(e, NO_SETTING) for e in corpus.examples[:4]]
    batched = likelihood.loglik(requests)
    assert np.isfinite(batched.logp_sum).all() and (batched.logp_sum < 0).all()
    assert np.isfinite(batched.logp_mean).all()
    expected_tokens = [
        len(ja_template.response.format(text=r.example.response).encode()) + 1 for r in requests
    ]
    assert batched.n_tokens.tolist() == expected_tokens
    singles = np.array([likelihood.loglik([r]).logp_sum[0] for r in requests[:6]])
    np.testing.assert_allclose(batched.logp_sum[:6], singles, atol=1e-3)


# ----------------------------------------------------------------------------------------------- (c) LSR fit
def record_candidates(module: LSRModule) -> list[tuple[str, object, list]]:
    """Wrap ``module.candidates`` to log (stage, example, candidate SettingRecords) for every query."""
    seen: list[tuple[str, object, list]] = []
    original = module.candidates

    def candidates(examples):
        cands = original(examples)
        stage = "train" if module.trainer.training else "val"
        for e, row in zip(examples, cands):
            seen.append((stage, e, [module.index.records[i] for i in row]))
        return cands

    module.candidates = candidates
    return seen


@pytest.fixture(scope="module")
def fitted(ja_dir, ja_template, tmp_path_factory):
    """A 4-step LSR fit on the Japanese corpus and its export (shared by the fit/export/evaluate tests)."""
    L.seed_everything(0, verbose=False)
    module = LSRModule(
        encoder="tiny:bert",
        template=ja_template,
        k=K,
        lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None),
        optimizer=OptimizerOptions(learning_rate=1e-3),
    )
    seen = record_candidates(module)
    before = {k: v.detach().clone() for k, v in module.encoder.state_dict().items()}
    dm = LSRDataModule(data_dir=str(ja_dir), batch_size=4, split=SplitSpec(val_fraction=VAL_FRACTION))
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    train_ids, val_ids = the_split(SETTINGS)
    export = export_retriever(
        module,
        tmp_path_factory.mktemp("ja-export") / "retriever",
        data_dir=str(ja_dir),
        train_characters=sorted(train_ids),
    )
    return types.SimpleNamespace(
        module=module,
        trainer=trainer,
        dm=dm,
        seen=seen,
        before=before,
        export=export,
        train_ids=train_ids,
        val_ids=val_ids,
    )


def test_lsr_fit_on_japanese_uses_faiss_candidates_of_the_own_character(fitted):
    module, trainer, dm = fitted.module, fitted.trainer, fitted.dm
    assert trainer.global_step == 4
    assert len(fitted.val_ids) == 1 and len(fitted.train_ids) == 3
    assert {e.character_id for e in dm.train_examples} == fitted.train_ids
    assert module.template.setting_line == "人物設定: {setting}\n"

    train = [(e, recs) for stage, e, recs in fitted.seen if stage == "train"]
    assert len(train) == 4 * 4  # 4 steps x batch 4
    for e, recs in train:
        assert e.character_id in fitted.train_ids
        assert len(recs) == K  # top-5 of the character's 10 settings from the index ...
        assert len({r.setting_id for r in recs}) == K
        assert all(r.character_id == e.character_id for r in recs)  # ... all of its own character
        assert all(r.text == SETTINGS[e.character_id][r.index_in_character] for r in recs)
    assert len(module.index.records) == 40 and module.index.index.ntotal == 40  # every character's settings
    # the sanity-check validation ran on the held-out character, same rules
    val = [(e, recs) for stage, e, recs in fitted.seen if stage == "val"]
    assert val and all(e.character_id in fitted.val_ids for e, _ in val)
    assert all(len(recs) == K and {r.character_id for r in recs} == {e.character_id} for e, recs in val)
    # every (example, setting) candidate went through the LM exactly once
    pairs = {(e.example_id, r.text) for _, e, recs in fitted.seen for r in recs}
    assert module.likelihood.uncached.pairs_computed == len(pairs)

    after = module.encoder.state_dict()
    assert any(not torch.equal(fitted.before[k], after[k]) for k in fitted.before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------- (d) export
def test_exported_retriever_answers_a_japanese_greeting(fitted, ja_template):
    export = fitted.export
    for name in ("encoder", "index.faiss", "settings.jsonl", "index.json", "retriever.json"):
        assert (export / name).exists(), name
    config = json.loads((export / "retriever.json").read_bytes().decode("utf-8"))
    assert PromptTemplate(**config["template"]) == ja_template
    settings_lines = (export / "settings.jsonl").read_bytes().decode("utf-8").splitlines()
    assert json.loads(settings_lines[0])["text"] == SETTINGS["ja-A"][0]
    assert "私はパン屋" in settings_lines[0]  # written as UTF-8 text, not \u escapes

    retriever = Retriever.load(export)
    texts = ["こんにちは！", *SETTINGS["ja-C"][:3]]
    np.testing.assert_allclose(
        retriever.encoder.encode(texts, normalize_embeddings=True), fitted.module.encode_all(texts), atol=1e-5
    )
    for cid, settings in SETTINGS.items():
        hits = retriever.search(cid, "こんにちは！", k=3)
        assert len(hits) == 3
        assert all(h.setting in settings and settings[h.index_in_character] == h.setting for h in hits)
        assert len({h.setting_id for h in hits}) == 3
        # the top 3 of an exact cosine ranking of this character's settings, best first
        q = retriever.encoder.encode(["こんにちは！"], normalize_embeddings=True)[0]
        cos = retriever.encoder.encode(list(settings), normalize_embeddings=True) @ q
        assert [h.index_in_character for h in hits] == np.argsort(-cos, kind="stable")[:3].tolist()
        np.testing.assert_allclose([h.similarity for h in hits], np.sort(cos)[::-1][:3], atol=1e-5)


@pytest.mark.parametrize("locale_encoding", ["cp1252", "cp932"])
def test_export_with_japanese_template_is_utf8_under_any_locale(
    fitted, ja_template, tmp_path, monkeypatch, locale_encoding
):
    """Emulate a non-UTF-8 locale: text I/O without an explicit encoding uses ``locale_encoding``."""
    write_text, read_text = pathlib.Path.write_text, pathlib.Path.read_text

    def write_locale(self, data, encoding=None, errors=None, newline=None):
        return write_text(self, data, encoding=encoding or locale_encoding, errors=errors, newline=newline)

    def read_locale(self, encoding=None, errors=None):
        return read_text(self, encoding=encoding or locale_encoding, errors=errors)

    monkeypatch.setattr(pathlib.Path, "write_text", write_locale)
    monkeypatch.setattr(pathlib.Path, "read_text", read_locale)
    out = export_retriever(fitted.module, tmp_path / "retriever", train_characters=sorted(fitted.train_ids))
    config = json.loads((out / "retriever.json").read_bytes().decode("utf-8"))
    assert config["template"]["setting_line"] == "人物設定: {setting}\n"
    assert Retriever.load(out).template == ja_template


# ----------------------------------------------------------------------------------------------- (e) evaluate
def test_evaluate_on_japanese_runs_every_method(fitted, ja_dir, ja_template, tmp_path):
    out_dir = tmp_path / "eval"
    result = evaluate(
        data_dir=str(ja_dir),
        base_encoder="tiny:bert",
        lm="tiny:gpt2",
        template=ja_template,
        retriever=str(fitted.export),
        split="val",
        val_fraction=VAL_FRACTION,
        max_examples=None,
        distractors=5,
        n_boot=50,
        loglik_cache_dir=None,
        out=str(out_dir),
        max_length=512,
    )
    for name in ("results.json", "results.md", "results.png"):
        assert (out_dir / name).stat().st_size > 0, name
    assert (out_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    assert set(saved["table"]) == set(ev.METHODS)
    assert saved["table"] == json.loads(json.dumps(result.table))
    (val_char,) = fitted.val_ids
    assert saved["meta"]["n_examples"] == 6 and saved["meta"]["n_characters"] == 1
    for method in ev.METHODS:
        cell = saved["table"][method]["all"]["nll_top1"]
        assert cell["n"] == 6 and math.isfinite(cell["mean"]) and cell["mean"] > 0, method
        assert "greeting" in saved["table"][method], method
    # the oracle picks the LM-best setting for every example: nothing beats it
    nll = {m: saved["table"][m]["all"]["nll_top1"]["mean"] for m in ev.METHODS}
    assert all(nll["oracle"] <= v + 1e-9 for v in nll.values())
    assert saved["table"]["oracle"]["all"]["hit1_lm_best"]["mean"] == 1.0
    assert set(saved["pool"]) == set(ev.METHODS) - {"none"}
    assert all(math.isfinite(v) for row in saved["pool"].values() for v in row.values())
    md = (out_dir / "results.md").read_text(encoding="utf-8")
    assert "| bm25 |" in md and "| trained+prior |" in md

    # BM25 on Japanese text: runs, one finite score per setting of the character
    corpus = Corpus.load(ja_dir)
    val_examples = [e for e in corpus.examples if e.character_id == val_char]
    bm25 = ev.bm25_scores(val_examples, corpus.characters)
    assert len(bm25) == 6
    assert all(s.shape == (10,) and np.isfinite(s).all() for s in bm25)
    bm25_cell = saved["table"]["bm25"]["all"]
    assert all(math.isfinite(bm25_cell[m]["mean"]) for m in ("nll_top1", "hit1_lm_best", "ndcg", "mrr"))


def test_bm25_matches_shared_japanese_words():
    settings = ["私は猫が好きです。", "毎朝パンを焼いています。", "大阪出身です。"]
    (scores,) = ev.bm25_rank(settings, ["猫は好きですか？"], "ja")
    assert scores[0] > 0 and scores[0] > scores[1] and scores[0] > scores[2]


# ----------------------------------------------------------------------------------------------- real data
def rpc_subset(dest: Path, n_characters: int = 3, n_examples: int = 8) -> tuple[list[str], Path]:
    """Copy the first ``n_characters`` characters and their first ``n_examples`` examples (verbatim lines)."""
    dest.mkdir(parents=True)
    char_lines = (RPC_DIR / "characters.jsonl").read_bytes().splitlines()[:n_characters]
    ids = [json.loads(line)["character_id"] for line in char_lines]
    picked: dict[str, list[bytes]] = defaultdict(list)
    with (RPC_DIR / "dialogues.jsonl").open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            cid = json.loads(line)["character_id"]
            if cid in ids and len(picked[cid]) < n_examples:
                picked[cid].append(line.rstrip(b"\n"))
                if all(len(picked[c]) == n_examples for c in ids):
                    break
    (dest / "characters.jsonl").write_bytes(b"\n".join(char_lines) + b"\n")
    (dest / "dialogues.jsonl").write_bytes(b"\n".join(line for c in ids for line in picked[c]) + b"\n")
    return ids, dest


@pytest.mark.slow
def test_real_persona_chat_subset_fits_exports_and_retrieves(tmp_path, ja_template):
    if not (RPC_DIR / "characters.jsonl").is_file() or not (RPC_DIR / "dialogues.jsonl").is_file():
        pytest.skip(f"RealPersonaChat shared data not found at {RPC_DIR} (see ../shared/data/README.md)")
    ids, data = rpc_subset(tmp_path / "rpc")

    corpus = Corpus.load(data)
    assert list(corpus.characters) == ids
    source = {
        json.loads(line)["character_id"]: json.loads(line)
        for line in (data / "characters.jsonl").read_text(encoding="utf-8").splitlines()
    }
    for cid, char in corpus.characters.items():
        assert char.language == "ja"
        assert len(char.settings) == 10
        assert char.settings == tuple(source[cid]["settings"])
    assert len(corpus.examples) == 3 * 8
    assert {e.character_id for e in corpus.examples} == set(ids)
    greetings = [e for e in corpus.examples if e.query_type == "greeting"]
    assert greetings, "the first turns of RealPersonaChat dialogues are greetings"

    L.seed_everything(0, verbose=False)
    module = LSRModule(
        encoder="tiny:bert",
        template=ja_template,
        k=K,
        lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None),
    )
    seen = record_candidates(module)
    before = {k: v.detach().clone() for k, v in module.encoder.state_dict().items()}
    dm = LSRDataModule(data_dir=str(data), batch_size=4, split=SplitSpec(val_fraction=0.34))
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    train = [(e, recs) for stage, e, recs in seen if stage == "train"]
    assert len(train) == 2 * 4
    assert all(len(recs) == K and {r.character_id for r in recs} == {e.character_id} for e, recs in train)
    after = module.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    export = export_retriever(module, tmp_path / "retriever", data_dir=str(data))
    index = SettingIndex.load(export)
    assert len(index.records) == 30
    retriever = Retriever.load(export)
    greeting = greetings[0]
    hits = retriever.search(greeting.character_id, greeting.query, k=3)
    settings = corpus.characters[greeting.character_id].settings
    assert len(hits) == 3 and len({h.setting_id for h in hits}) == 3
    assert all(settings[h.index_in_character] == h.setting for h in hits)
    assert all(math.isfinite(h.score) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
