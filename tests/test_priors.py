"""Generality priors, their import validation, λ / threshold calibration, and leave-one-dialogue-out priors."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from replugchar.core.data import Character, DataError, Example
from replugchar.lm.gains import loo_priors
from replugchar.retrieval.index import SettingIndex, setting_records
from replugchar.training import calibration
from replugchar.training.priors import Prior, import_priors, load_priors, prior_vector, save_priors

CHARS = {
    "a": Character("a", ("cheerful with everyone", "works night shifts", "has a cat")),
    "b": Character("b", ("likes jazz", "hates mornings")),
}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_import_jsonl_by_index_and_text_is_znormalised_within_character(tmp_path):
    rows = [{"character_id": "a", "index_in_character": i, "score": s} for i, s in enumerate([5, 1, 3])]
    rows += [
        {"character_id": "b", "setting": "likes jazz", "score": 2},
        {"character_id": "b", "setting": "hates mornings", "score": 4},
    ]
    table = import_priors(_jsonl(tmp_path / "p.jsonl", rows), CHARS)
    by = {(p.character_id, p.index_in_character): p for p in table}
    assert by[("a", 0)].prior > by[("a", 2)].prior > by[("a", 1)].prior
    for cid in CHARS:
        z = [p.prior for p in table if p.character_id == cid]
        assert abs(np.mean(z)) < 1e-9 and abs(np.std(z) - 1) < 1e-9
    assert by[("b", 1)].raw == 4 and by[("a", 0)].method == "import"


def test_import_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("character_id,index_in_character,score\nb,0,1\nb,1,3\n", encoding="utf-8")
    table = import_priors(path, CHARS)
    assert [p.index_in_character for p in table] == [0, 1] and table[1].prior > table[0].prior


def test_a_0_1_file_with_setting_id_reads_as_the_position_and_its_errors_name_that_column(tmp_path):
    """0.1's import files called the position ``setting_id`` (the index's name for a global row): still read,
    as the same position, and a bad value is reported under the column the file used."""
    new = _jsonl(
        tmp_path / "new.jsonl",
        [{"character_id": "b", "index_in_character": i, "score": s} for i, s in [(0, 1), (1, 3)]],
    )
    old = tmp_path / "old.csv"
    old.write_text("character_id,setting_id,score\nb,0,1\nb,1,3\n", encoding="utf-8")
    assert [(p.index_in_character, p.prior) for p in import_priors(old, CHARS)] == [
        (p.index_in_character, p.prior) for p in import_priors(new, CHARS)
    ]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"character_id": "b", "index_in_character": 9, "score": 1}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'index_in_character': 9 out of range"):
        import_priors(bad, CHARS)
    headless = tmp_path / "h.csv"
    headless.write_text("character_id,score\nb,1\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"h\.csv:1: the header must name .*index_in_character \(or setting\)"
    ):
        import_priors(headless, CHARS)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"character_id": "a", "setting_id": 0, "score": float("nan")}, r"p.jsonl:1: field 'score' is nan"),
        ({"character_id": "a", "setting_id": 0, "score": float("inf")}, r"p.jsonl:1: field 'score' is inf"),
        (
            {"character_id": "zz", "setting_id": 0, "score": 1},
            r"p.jsonl:1: field 'character_id': unknown character",
        ),
        (
            {"character_id": "a", "setting_id": 7, "score": 1},
            r"p.jsonl:1: field 'setting_id': 7 out of range",
        ),
        (
            {"character_id": "a", "setting": "is a pirate", "score": 1},
            r"p.jsonl:1: field 'setting': unknown setting",
        ),
        ({"character_id": "a", "setting_id": 0}, r"p.jsonl:1: field 'score' missing or not a number"),
    ],
    ids=["nan", "inf", "unknown-character", "index-out-of-range", "unknown-setting-text", "missing-score"],
)
def test_bad_imported_priors_name_file_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        import_priors(_jsonl(tmp_path / "p.jsonl", [row]), CHARS)


def test_import_with_scores_for_only_some_settings_is_rejected(tmp_path):
    with pytest.raises(DataError, match="only some settings: a"):
        import_priors(
            _jsonl(tmp_path / "p.jsonl", [{"character_id": "a", "setting_id": 0, "score": 1}]), CHARS
        )


def test_saved_priors_round_trip_and_loading_validates(tmp_path):
    table = [
        Prior("a", i, CHARS["a"].settings[i], z, z, None, 3, "lm_utility", "lm=x")
        for i, z in enumerate([1.0, -1.0, 0.0])
    ]
    save_priors(table, tmp_path / "priors.jsonl")
    assert not list(tmp_path.glob(".*.tmp"))
    assert load_priors(tmp_path / "priors.jsonl", CHARS) == table
    _jsonl(
        tmp_path / "bad.jsonl",
        [{"character_id": "a", "index_in_character": 9, "setting": "x", "prior": 1.0, "raw": 1.0}],
    )
    with pytest.raises(DataError, match=r"bad.jsonl:1: prior for unknown setting 'a'\[9\]"):
        load_priors(tmp_path / "bad.jsonl", CHARS)
    old = [
        {**{k: v for k, v in asdict(p).items() if k != "index_in_character"}, "setting_index": i}
        for i, p in enumerate(table)
    ]
    _jsonl(tmp_path / "old.jsonl", old)  # written before index_in_character had its one name
    assert load_priors(tmp_path / "old.jsonl", CHARS) == table
    _jsonl(
        tmp_path / "nan.jsonl",
        [{"character_id": "a", "index_in_character": 0, "setting": "x", "prior": float("nan"), "raw": 1.0}],
    )
    with pytest.raises(DataError, match=r"nan.jsonl:1: field 'prior' is nan"):
        load_priors(tmp_path / "nan.jsonl", CHARS)


def test_prior_vector_aligns_with_index_records_and_blends_exactly():
    table = [Prior("a", 0, "", 2.0, 0.0), Prior("b", 1, "", -1.0, 0.0)]
    records = setting_records(CHARS)
    g = prior_vector(table, records)
    assert g.tolist() == [2.0, 0.0, 0.0, 0.0, -1.0]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = SettingIndex.build(emb, records, g)
    q = emb[:1]
    scores, ids = index.search(q, 3, character_ids=["a"], prior_weight=0.5)
    expected = emb[:3] @ q[0] + 0.5 * g[:3]
    assert ids[0].tolist() == np.argsort(-expected).tolist()
    assert np.allclose(scores[0], np.sort(expected)[::-1], atol=1e-5)


def test_loo_prior_never_uses_the_examples_own_dialogue():
    ex = [
        Example(f"e{i}", "a", f"d{i // 2}", "q", "r") for i in range(4)
    ]  # dialogues d0 (e0, e1), d1 (e2, e3)
    gains = [
        np.array([1.0, 0.0, 0.0]),
        np.array([1.0, 0.0, 0.0]),
        np.array([0.0, 0.0, 1.0]),
        np.array([0.0, 0.0, 1.0]),
    ]
    priors = loo_priors(ex, gains)
    assert int(np.argmax(priors[0])) == 2  # from d1 only
    assert int(np.argmax(priors[2])) == 0  # from d0 only


def test_calibration_picks_the_weight_and_threshold_that_maximise_lm_likelihood():
    # 3 examples x 3 settings: similarity prefers setting 0, the prior prefers setting 2, the LM gains favour 2
    sims = np.array([[0.9, 0.1, 0.5]] * 3)
    priors = np.array([[-1.0, 0.0, 1.0]] * 3)
    gains = np.array([[-0.2, 0.0, 0.3]] * 3)
    cal = calibration.fit(sims, priors, gains, grid=(0.0, 0.1, 1.0), fit_threshold=False)
    assert cal.prior_weight == 1.0
    assert cal.gain_at_zero == pytest.approx(-0.2) and cal.gain_fitted_weight == pytest.approx(0.3)
    # a harmful top-1 everywhere: the threshold drops it (no setting, gain 0) and beats keeping it
    cal = calibration.fit(sims, priors, np.array([[-0.2, -0.1, -0.3]] * 3), grid=(0.0,), fit_threshold=True)
    assert cal.threshold is not None and cal.gain_fitted == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no validation examples"):
        calibration.fit(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)))
