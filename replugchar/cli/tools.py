"""Tool commands: loglik, priors, index, export, retrieve, add-characters.

Each is a typed function: its signature and docstring are its ``--help`` (:mod:`replugchar.cli.commands` builds the
parser). The ones that take ``fit`` read the same YAML as ``fit`` (``--config``), so the LM, template, log-likelihood cache
and character split are the ones training used; ``--model.X`` / ``--data.X`` options after it override the YAML.
The YAML is parsed only when the command needs the model (:meth:`FitConfig.load`), after its own options are
checked: a missing file or a bad flag must not wait for torch and Lightning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ..core.atomic import write_text

Kind = Literal["flat", "ivf", "hnsw"]


@dataclass(frozen=True)
class FitConfig:
    """A fit config (``--config``) and the ``--model.X`` / ``--data.X`` options given after it, not parsed yet."""

    config: str | None = None
    overrides: tuple[str, ...] = ()

    def load(self, ckpt_path: str | None = None):
        """(module, datamodule) of the config, trained weights from ``ckpt_path`` if given
        (:func:`replugchar.training.run.load_run`, imported here: it imports torch and Lightning)."""
        from ..training.run import load_run

        return load_run((["--config", self.config] if self.config else []) + list(self.overrides), ckpt_path)


def _examples(dm, split: str):
    splits = {"train": dm.train_examples, "val": dm.val_examples, "test": dm.test_examples}
    if split == "all":
        return dm.train_examples + dm.val_examples
    if split == "every":
        return dm.train_examples + dm.val_examples + dm.test_examples
    return splits[split]


def _need_file(path: str | None, flag: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: file not found ({flag})")


def loglik(
    fit: FitConfig, split: Literal["train", "val", "test", "all", "every"] = "all", chunk: int = 64
) -> None:
    """Fill the log-likelihood cache for every (example, setting) pair of a split and its no-setting prompt.

    Args:
        split: all = train + val (what fit reads); every = train + val + test.
        chunk: pairs per cache flush.
    """
    from tqdm.auto import tqdm

    from ..lm.likelihood import NO_SETTING, LoglikRequest

    module, dm = fit.load()
    likelihood = module.likelihood
    requests = []
    for e in _examples(dm, split):
        requests.append(LoglikRequest(e, NO_SETTING))
        requests += [LoglikRequest(e, (s,)) for s in dm.characters[e.character_id].settings]
    todo = [r for r in requests if r not in likelihood]
    print(
        f"loglik: {len(requests)} pairs, {len(requests) - len(todo)} already cached, {len(todo)} to compute"
    )
    for i in tqdm(range(0, len(todo), chunk), desc="LM log-likelihoods", unit="chunk"):
        likelihood.loglik(todo[i : i + chunk])
        likelihood.flush()
    print(f"log-likelihood cache: {likelihood.folder} ({len(likelihood)} pairs)")


def _save_priors(module, table, out: str, method: str) -> None:
    from ..training.priors import save_priors

    module.flush_logliks()
    save_priors(table, out)
    print(f"{len(table)} priors ({method}) written to {out}")


def priors_lm_utility(fit: FitConfig, out: str) -> None:
    """Generality prior of each setting: its LM utility (gain over no setting) in the training dialogues.

    Args:
        out: priors.jsonl to write.
    """
    from ..training.priors import lm_utility_priors

    module, dm = fit.load()
    _save_priors(
        module, lm_utility_priors(dm.train_examples, dm.characters, module.likelihood), out, "lm-utility"
    )


def priors_judge(fit: FitConfig, out: str, judge_lm: str | None = None, template: str | None = None) -> None:
    """Generality prior of each setting: a local LLM judge's expected 1-5 score of how broadly it applies.

    Args:
        out: priors.jsonl to write.
        judge_lm: LM spec of the judge (default: model.lm).
        template: file with a prompt template containing {setting} (default: the built-in one).
    """
    if template:
        _need_file(template, "--template")
    from ..lm.models import load_causal_lm
    from ..training import priors

    module, dm = fit.load()
    spec = judge_lm or module.lm_options.name
    model, tok = load_causal_lm(spec, trust_remote_code=module.lm_options.trust_remote_code)
    text = Path(template).read_text(encoding="utf-8") if template else priors.JUDGE_TEMPLATE
    _save_priors(module, priors.llm_judge_priors(dm.characters, model, tok, text, lm_id=spec), out, "judge")


def priors_import(fit: FitConfig, out: str, file: str) -> None:
    """Generality prior of each setting from an external judge's scores.

    Args:
        out: priors.jsonl to write.
        file: JSONL/CSV with character_id, index_in_character (or setting: its exact text) and score.
    """
    _need_file(file, "--file")
    from ..training.priors import import_priors

    module, dm = fit.load()
    _save_priors(module, import_priors(file, dm.characters), out, "import")


def priors_fit_weight(fit: FitConfig, out: str, priors: str, ckpt_path: str | None = None) -> None:
    """Fit the dialogue scale α, the prior weight λ and the relevance threshold τ on the validation characters
    against the LM (what ``export --fitted`` reads).

    Args:
        out: fitted.json to write.
        priors: priors.jsonl from ``replugchar priors``.
        ckpt_path: trained checkpoint (default: the config's encoder).
    """
    _need_file(priors, "--priors")
    from ..training import calibration
    from ..training.priors import load_priors

    module, dm = fit.load(ckpt_path)
    table = load_priors(priors, dm.characters)
    sims, prior_m, gains, dialogue = calibration.validation_matrices(
        module, dm.val_examples, dm.characters, table
    )
    cal = calibration.fit(sims, prior_m, gains, dialogue=dialogue)
    fitted = {**asdict(cal), "dialogue_weights": list(module.rule.weights)}
    write_text(out, json.dumps(fitted, indent=2))
    print(json.dumps(fitted, indent=2))
    print(f"fitted dialogue scale, prior weight and threshold written to {out}")


def _fitted_rule(module, fitted_path: str | None, prior_weight: float | None):
    """The exported rule: learned weights scaled by the fitted α, the fitted λ and τ (``--prior_weight`` wins)."""
    import dataclasses

    from ..core.data import DataError
    from ..core.scoring import ScoringRule

    rule = module.rule
    if fitted_path:
        fitted = read_fitted(fitted_path)
        weights = fitted.get("dialogue_weights", rule.weights)
        if len(weights) != len(rule.weights):
            raise DataError(f"{fitted_path}: field 'dialogue_weights' needs {len(rule.weights)} numbers")
        alpha = float(fitted.get("dialogue_scale", 1.0))
        rule = ScoringRule(
            weights=tuple(alpha * float(w) for w in weights),
            prior_weight=float(fitted.get("prior_weight", 0.0)),
            threshold=fitted.get("threshold"),
            history_window=rule.history_window,
        )
    if prior_weight is not None:
        rule = dataclasses.replace(rule, prior_weight=prior_weight)
    return rule


def _prior_vector(path: str | None, dm, records):
    from ..training.priors import load_priors, prior_vector

    if not path:
        return None, None
    table = load_priors(path, dm.characters)
    return table, prior_vector(table, records)


def index(
    fit: FitConfig, out: str, ckpt_path: str | None = None, priors: str | None = None, kind: Kind = "flat"
) -> None:
    """Rebuild the FAISS index of every setting (after the encoder or the priors changed).

    Args:
        out: index folder to write.
        ckpt_path: trained checkpoint (default: the config's untrained encoder).
        priors: priors.jsonl from ``replugchar priors`` (its prior coordinate; default none).
        kind: flat (exact), ivf or hnsw (approximate, for searches across characters' pooled settings, as
            another RAG stack may run on index.faiss); a per-character search is exact for every kind.
    """
    from ..retrieval.index import SettingIndex, encoder_fingerprint, setting_records

    module, dm = fit.load(ckpt_path)
    records = setting_records(dm.characters)
    table, prior = _prior_vector(priors, dm, records)
    fp = encoder_fingerprint(lambda t: module.encode_all(t))
    built = SettingIndex.build(
        module.encode_all([r.text for r in records]), records, prior, kind=kind, encoder_fingerprint=fp
    )
    built.save(out)
    print(f"index ({kind}, {len(records)} settings, prior={'yes' if table else 'no'}) written to {out}")


def export(
    fit: FitConfig,
    out: str,
    ckpt_path: str | None = None,
    priors: str | None = None,
    kind: Kind = "flat",
    fitted: str | None = None,
    prior_weight: float | None = None,
) -> None:
    """Export the encoder, the index and the scoring rule as one folder for other RAG stacks.

    Args:
        out: export folder to write (replaced whole or not at all).
        ckpt_path: the checkpoint whose encoder and dialogue head are exported (default: the config's untrained
            ones).
        priors: priors.jsonl from ``replugchar priors``: copied into the folder and blended into index.faiss
            (default: no imported prior).
        kind: index.faiss's kind: flat (exact) or ivf / hnsw (approximate: pays for searches across characters'
            pooled settings); a per-character search is exact for every kind.
        fitted: JSON from ``priors fit-weight`` (dialogue scale, λ, threshold).
        prior_weight: λ (overrides --fitted).
    """
    from ..retrieval.export import export_retriever
    from ..retrieval.index import setting_records
    from ..training.priors import save_priors

    module, dm = fit.load(ckpt_path)
    table, prior = _prior_vector(priors, dm, setting_records(dm.characters))
    rule = _fitted_rule(module, fitted, prior_weight)
    folder = export_retriever(
        module,
        out,
        priors=prior,
        rule=rule,
        kind=kind,
        data_dir=str(dm.hparams.data_dir),
        train_characters=sorted({e.character_id for e in dm.train_examples}),
        split=dm.split.to_dict(),
        extra=(lambda tmp: save_priors(table, tmp / "priors.jsonl")) if table else None,
    )
    print(f"retriever exported to {folder} (scoring rule: {json.dumps(rule.to_dict())})")


def add_characters(retriever: str, characters: str, out: str | None = None) -> None:
    """Add characters to an export folder: their settings embedded by its encoder, with its learned generality,
    no retraining.

    Args:
        retriever: export folder to add to (replaced atomically unless --out).
        characters: characters.jsonl in the data schema.
        out: write the extended folder here instead of replacing --retriever.
    """
    from ..core.data import load_characters
    from ..retrieval.export import add_characters as add

    loaded = load_characters(characters)
    folder = add(retriever, loaded, out=out)
    n = sum(len(c.settings) for c in loaded.values())
    print(f"{len(loaded)} character(s), {n} settings added to {folder}")


def retrieve(
    retriever: str,
    character: str,
    query: str,
    history: str | None = None,
    k: int | None = None,
    prior_weight: float | None = None,
    no_threshold: bool = False,
) -> None:
    """Print a character's top settings for a query: score, similarity, dialogue part and prior of each.

    Args:
        retriever: export folder (``replugchar export`` / the end of ``fit``).
        character: character id (one in the export's index).
        query: the user's turn.
        history: JSON file: list of {role, text} turns before the query, oldest first.
        k: settings listed (default: retriever.json).
        prior_weight: λ (default: retriever.json).
        no_threshold: list the top k even under the relevance threshold.
    """
    from ..retrieval.retriever import Retriever

    loaded = Retriever.load(retriever)
    turns = _read_history(history) if history else ()
    threshold = float("-inf") if no_threshold else None
    hits = loaded.search(character, query, k, history=turns, prior_weight=prior_weight, threshold=threshold)
    print(f"{character} | {query!r}")
    print(f"{'rank':>4} {'score':>7} {'sim':>7} {'dialog':>7} {'prior':>7}  setting")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:>4} {h.score:7.3f} {h.similarity:7.3f} {h.dialogue:7.3f} {h.prior:7.3f}  {h.setting}")
    if not hits:
        print("  (no setting above the relevance threshold: answer without settings)")


def read_fitted(path: str) -> dict:
    """fitted.json of ``priors fit-weight``: the numbers ``export --fitted`` uses, each checked."""
    from ..retrieval.export_schema import check_fields, is_number, read_json

    numbers = lambda v: isinstance(v, list) and all(map(is_number, v))  # noqa: E731
    number = (is_number, "a finite number")
    spec = {
        "dialogue_scale": number,
        "prior_weight": number,
        "threshold": (lambda v: v is None or is_number(v), "a finite number or null"),
        "dialogue_weights": (numbers, "a list of numbers"),
        "gain_at_zero": number,
        "gain_fitted_weight": number,
        "gain_fitted": number,
        "n_examples": number,
        "grid": (numbers, "a list of numbers"),
        "gains_by_weight": (numbers, "a list of numbers"),
    }
    return check_fields(read_json(Path(path), what="fitted"), spec, f"{path}")


def _read_history(path: str) -> list[dict]:
    """A JSON list of {"role", "text"} turns, oldest first (the data schema's ``context``), capped like data."""
    from ..core.data import MAX_TEXT_CHARS, DataError
    from ..retrieval.export_schema import read_json

    turns = read_json(Path(path), what="--history")
    if not isinstance(turns, list):
        raise DataError(
            f"{path}: --history must be a JSON list of {{'role': 'user'|'character', 'text': ...}}"
        )
    for i, t in enumerate(turns):
        if not (
            isinstance(t, dict) and t.get("role") in ("user", "character") and isinstance(t.get("text"), str)
        ):
            raise DataError(f"{path}: turn {i} must be {{'role': 'user'|'character', 'text': ...}}")
        if not t["text"].strip() or len(t["text"]) > MAX_TEXT_CHARS:
            raise DataError(f"{path}: turn {i}: text is empty or over {MAX_TEXT_CHARS} characters")
    return turns
