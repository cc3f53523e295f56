"""Tool commands: score, priors, index, export, retrieve.

Each reads the same YAML as ``fit`` (``--config``), so the LM, template, score cache and character split are the
ones training used; options after the tool's own flags override the YAML (e.g. ``--model.lm.name ...``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ..core.atomic import write_text
from .commands import COMMANDS

CONFIG_HELP = "fit config (configs/*.yaml); later --model.X / --data.X options override it"


def _examples(dm, split: str):
    splits = {"train": dm.train_examples, "val": dm.val_examples, "test": dm.test_examples}
    if split == "all":
        return dm.train_examples + dm.val_examples
    if split == "every":
        return dm.train_examples + dm.val_examples + dm.test_examples
    return splits[split]


def _config_args(args, rest: list[str]) -> list[str]:
    return (["--config", args.config] if args.config else []) + rest


def load_run(config_args: list[str], ckpt_path: str | None = None):
    """:func:`replugchar.training.run.load_run`, imported on use: option errors must not wait for torch and Lightning."""
    from ..training.run import load_run as load

    return load(config_args, ckpt_path)


def cmd_score(args, rest) -> None:
    """Fill the score cache for every (example, setting) pair and the no-setting prompt."""
    from tqdm.auto import tqdm

    from ..lm.scoring import NO_SETTING, ScoreRequest

    module, dm = load_run(_config_args(args, rest))
    scorer = module.scorer
    requests = []
    for e in _examples(dm, args.split):
        requests.append(ScoreRequest(e, NO_SETTING))
        requests += [ScoreRequest(e, (s,)) for s in dm.characters[e.character_id].settings]
    todo = [r for r in requests if r not in scorer]
    print(f"score: {len(requests)} pairs, {len(requests) - len(todo)} already cached, {len(todo)} to score")
    for i in tqdm(range(0, len(todo), args.chunk), desc="LM scoring", unit="chunk"):
        scorer.score(todo[i : i + args.chunk])
        scorer.flush()
    print(f"score cache: {scorer.folder} ({len(scorer)} scores)")


def cmd_priors(args, rest) -> None:
    needs = {"import": ("file",), "fit-weight": ("priors",)}.get(args.method, ())
    for name in needs:  # before anything heavy is imported
        if not getattr(args, name):
            raise ValueError(f"priors {args.method} needs --{name}")
        if not Path(getattr(args, name)).is_file():
            raise FileNotFoundError(f"{getattr(args, name)}: file not found (--{name})")
    from ..training import calibration, priors

    if args.method == "fit-weight":
        module, dm = load_run(_config_args(args, rest), args.ckpt_path)
        table = priors.load_priors(args.priors, dm.characters)
        sims, prior_m, gains, dialogue = calibration.validation_matrices(
            module, dm.val_examples, dm.characters, table
        )
        cal = calibration.fit(sims, prior_m, gains, dialogue=dialogue)
        fitted = {**asdict(cal), "dialogue_weights": list(module.rule.weights)}
        write_text(args.out, json.dumps(fitted, indent=2))
        print(json.dumps(fitted, indent=2))
        print(f"fitted dialogue scale, prior weight and threshold written to {args.out}")
        return
    module, dm = load_run(_config_args(args, rest))
    if args.method == "lm-utility":
        table = priors.lm_utility_priors(dm.train_examples, dm.characters, module.scorer)
    elif args.method == "judge":
        from ..lm.models import load_causal_lm

        spec = args.judge_lm or module.lm_options.name
        model, tok = load_causal_lm(spec, trust_remote_code=module.lm_options.trust_remote_code)
        template = Path(args.template).read_text(encoding="utf-8") if args.template else priors.JUDGE_TEMPLATE
        table = priors.llm_judge_priors(dm.characters, model, tok, template, lm_id=spec)
    else:
        table = priors.import_priors(args.file, dm.characters)
    module.flush_scores()
    priors.save_priors(table, args.out)
    print(f"{len(table)} priors ({args.method}) written to {args.out}")


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


def _prior_vector(args, dm, records):
    from ..training.priors import load_priors, prior_vector

    if not args.priors:
        return None, None
    table = load_priors(args.priors, dm.characters)
    return table, prior_vector(table, records)


def cmd_index(args, rest) -> None:
    from ..retrieval.index import SettingIndex, encoder_fingerprint, setting_records

    module, dm = load_run(_config_args(args, rest), args.ckpt_path)
    records = setting_records(dm.characters)
    table, priors = _prior_vector(args, dm, records)
    fp = encoder_fingerprint(lambda t: module.encode_all(t))
    index = SettingIndex.build(
        module.encode_all([r.text for r in records]), records, priors, kind=args.kind, encoder_fingerprint=fp
    )
    index.save(args.out)
    print(
        f"index ({args.kind}, {len(records)} settings, prior={'yes' if table else 'no'}) written to {args.out}"
    )


def cmd_export(args, rest) -> None:
    from ..retrieval.export import export_retriever
    from ..retrieval.index import setting_records
    from ..training.priors import save_priors

    module, dm = load_run(_config_args(args, rest), args.ckpt_path)
    table, priors = _prior_vector(args, dm, setting_records(dm.characters))
    rule = _fitted_rule(module, args.fitted, args.prior_weight)
    out = export_retriever(
        module,
        args.out,
        priors=priors,
        rule=rule,
        kind=args.kind,
        data_dir=str(dm.hparams.data_dir),
        train_characters=sorted({e.character_id for e in dm.train_examples}),
        split=dm.split.to_dict(),
    )
    if table:
        save_priors(table, out / "priors.jsonl")
    print(f"retriever exported to {out} (scoring rule: {json.dumps(rule.to_dict())})")


def cmd_add_characters(args, rest) -> None:
    from ..core.data import load_characters
    from ..retrieval.export import add_characters

    characters = load_characters(args.characters)
    out = add_characters(args.dir, characters, out=args.out)
    n = sum(len(c.settings) for c in characters.values())
    print(f"{len(characters)} character(s), {n} settings added to {out}")


def cmd_retrieve(args, rest) -> None:
    from ..retrieval.retriever import Retriever

    retriever = Retriever.load(args.dir)
    threshold = float("-inf") if args.no_threshold else None
    history = _read_history(args.history) if args.history else ()
    hits = retriever.search(
        args.character,
        args.query,
        args.k,
        history=history,
        prior_weight=args.prior_weight,
        threshold=threshold,
    )
    print(f"{args.character} | {args.query!r}")
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


def build_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one tool command (``replugchar NAME --help``)."""
    p = argparse.ArgumentParser(prog=f"replugchar {name}", description=COMMANDS[name])
    if name not in ("retrieve", "add-characters"):
        p.add_argument("--config", help=CONFIG_HELP)
    if name == "score":
        p.add_argument(
            "--split",
            choices=("train", "val", "test", "all", "every"),
            default="all",
            help="all = train + val (what fit scores); every = train + val + test",
        )
        p.add_argument("--chunk", type=int, default=64, help="pairs per cache flush")
        p.set_defaults(func=cmd_score)
    elif name == "priors":
        p.add_argument("method", choices=("lm-utility", "judge", "import", "fit-weight"))
        p.add_argument("--out", required=True)
        p.add_argument(
            "--file", help="import: JSONL/CSV with character_id, setting_id (index or text), score"
        )
        p.add_argument("--judge_lm", help="judge: LM spec (default: model.lm)")
        p.add_argument("--template", help="judge: file with a prompt template containing {setting}")
        p.add_argument("--priors", help="fit-weight: priors.jsonl")
        p.add_argument("--ckpt_path", help="fit-weight: trained checkpoint (default: the config's encoder)")
        p.set_defaults(func=cmd_priors)
    elif name in ("index", "export"):
        p.add_argument("--out", required=True)
        p.add_argument("--ckpt_path", help="trained checkpoint (default: the config's untrained encoder)")
        p.add_argument("--priors", help="priors.jsonl from `replugchar priors`")
        p.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat")
        if name == "export":
            p.add_argument("--fitted", help="JSON from `priors fit-weight` (dialogue scale, λ, threshold)")
            p.add_argument("--prior_weight", type=float, help="λ (overrides --fitted)")
        p.set_defaults(func=cmd_index if name == "index" else cmd_export)
    elif name == "add-characters":
        p.add_argument("--dir", required=True, help="export folder to add to (replaced atomically)")
        p.add_argument("--characters", required=True, help="characters.jsonl in the data schema")
        p.add_argument("--out", help="write the extended folder here instead of replacing --dir")
        p.set_defaults(func=cmd_add_characters)
    elif name == "retrieve":
        p.add_argument("--dir", required=True, help="export folder")
        p.add_argument("--character", required=True)
        p.add_argument("--query", required=True)
        p.add_argument(
            "--history", help="JSON file: list of {role, text} turns before the query, oldest first"
        )
        p.add_argument("--k", type=int, default=None)
        p.add_argument("--prior_weight", type=float, default=None, help="λ (default: retriever.json)")
        p.add_argument(
            "--no_threshold", action="store_true", help="list the top k even under the relevance threshold"
        )
        p.set_defaults(func=cmd_retrieve)
    return p


def run_tool(name: str, argv: list[str]) -> None:
    parser = build_parser(name)
    args, rest = parser.parse_known_args(argv)
    if rest and (
        name in ("retrieve", "add-characters")
        or not all(a.startswith(("--model.", "--data.")) or not a.startswith("--") for a in rest)
    ):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.func(args, rest)
