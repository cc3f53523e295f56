"""Tool subcommands: score, priors, index, export, retrieve.

Each reads the same YAML as ``fit`` (``--config``), so the LM, template and score cache are the ones training
used; options after the tool's own flags override the YAML (e.g. ``--model.lm ...``).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _load(config_args: list[str], ckpt_path: str | None = None):
    """(module, datamodule) from a fit config, optionally with trained weights from a checkpoint."""
    import torch

    from .cli import LSRCLI
    from .data import LSRDataModule
    from .module import LSRModule

    cli = LSRCLI(LSRModule, LSRDataModule, run=False, args=config_args)
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    module.characters = dm.characters
    if ckpt_path:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{ckpt_path}: checkpoint does not match model.encoder "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    return module, dm


def _examples(dm, split: str):
    return {"train": dm.train_examples, "val": dm.val_examples, "all": dm.train_examples + dm.val_examples}[
        split
    ]


def cmd_score(args, rest) -> None:
    """Fill the score cache for every (example, setting) pair and the no-setting prompt."""
    from .lm_scoring import NO_SETTING, ScoreRequest

    module, dm = _load(rest)
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
    from . import calibration, priors

    if args.method == "fit-weight":
        module, dm = _load(rest, args.ckpt_path)
        table = priors.load_priors(args.priors, dm.characters)
        sims, prior_m, gains = validation_matrices(module, dm, table)
        cal = calibration.fit(sims, prior_m, gains)
        out = Path(args.out)
        out.write_text(json.dumps(asdict(cal), indent=2), encoding="utf-8")
        print(json.dumps(asdict(cal), indent=2))
        print(f"fitted prior weight and threshold written to {out}")
        return
    module, dm = _load(rest)
    if args.method == "lm-utility":
        table = priors.lm_utility_priors(dm.train_examples, dm.characters, module.scorer)
    elif args.method == "judge":
        from .models import load_causal_lm

        spec = args.judge_lm or module.hparams.lm
        model, tok = load_causal_lm(spec, trust_remote_code=module.hparams.trust_remote_code)
        template = Path(args.template).read_text(encoding="utf-8") if args.template else priors.JUDGE_TEMPLATE
        table = priors.llm_judge_priors(dm.characters, model, tok, template, lm_id=spec)
    elif args.method == "import":
        if not args.file:
            raise SystemExit("priors import needs --file scores.jsonl|csv")
        table = priors.import_priors(args.file, dm.characters)
    else:
        raise SystemExit(f"unknown priors method {args.method}")
    module.scorer.flush() if module._scorer is not None else None
    priors.save_priors(table, args.out)
    print(f"{len(table)} priors ({args.method}) written to {args.out}")


def validation_matrices(module, dm, table):
    """(sims, priors, gains), each (n_val, max_settings): the inputs of λ / τ calibration.

    A validation character the prior table does not cover (LM-utility priors come from training dialogues, and
    the split is by character) gets its leave-one-dialogue-out LM-utility prior from its other validation
    dialogues, so no example's own reply informs its prior.
    """
    from .priors import lm_table, loo_priors

    examples = dm.val_examples
    chars = dm.characters
    width = max(len(chars[e.character_id].settings) for e in examples)
    lookup = {(p.character_id, p.setting_index): p.prior for p in table}
    lm = lm_table(examples, chars, module.scorer)
    loo = loo_priors(examples, lm.gains)
    q = module.encode_all(module.query_strings(examples), queries=True)
    sims = np.full((len(examples), width), np.nan)
    prior_m = np.full((len(examples), width), np.nan)
    for row, e in enumerate(examples):
        settings = chars[e.character_id].settings
        s = module.encode_all(list(settings))
        sims[row, : len(settings)] = s @ q[row]
        covered = all((e.character_id, i) in lookup for i in range(len(settings)))
        prior_m[row, : len(settings)] = (
            [lookup[(e.character_id, i)] for i in range(len(settings))] if covered else loo[row]
        )
    return sims, prior_m, lm.gain_matrix()


def _priors_and_fit(args, dm):
    from .priors import load_priors, prior_vector

    table = load_priors(args.priors, dm.characters) if args.priors else None
    fitted = (
        json.loads(Path(args.fitted).read_text(encoding="utf-8")) if getattr(args, "fitted", None) else {}
    )
    return table, fitted, prior_vector


def cmd_index(args, rest) -> None:
    from .export import encoder_fingerprint
    from .index import SettingIndex, setting_records

    module, dm = _load(rest, args.ckpt_path)
    table, _, prior_vector = _priors_and_fit(args, dm)
    records = setting_records(dm.characters)
    priors = prior_vector(table, records) if table else None
    fp = encoder_fingerprint(lambda t: module.encode_all(t))
    index = SettingIndex.build(
        module.encode_all([r.text for r in records]), records, priors, kind=args.kind, encoder_fingerprint=fp
    )
    index.save(args.out)
    print(
        f"index ({args.kind}, {len(records)} settings, prior={'yes' if table else 'no'}) written to {args.out}"
    )


def cmd_export(args, rest) -> None:
    from .export import export_retriever
    from .index import setting_records

    module, dm = _load(rest, args.ckpt_path)
    table, fitted, prior_vector = _priors_and_fit(args, dm)
    priors = prior_vector(table, setting_records(dm.characters)) if table else None
    weight = args.prior_weight if args.prior_weight is not None else fitted.get("prior_weight", 0.0)
    out = export_retriever(
        module,
        args.out,
        priors=priors,
        prior_weight=weight,
        threshold=fitted.get("threshold"),
        kind=args.kind,
        data_dir=str(dm.hparams.data_dir),
        train_characters=sorted({e.character_id for e in dm.train_examples}),
    )
    if table:
        from .priors import save_priors

        save_priors(table, out / "priors.jsonl")
    print(f"retriever exported to {out} (prior_weight={weight}, threshold={fitted.get('threshold')})")


def cmd_retrieve(args, rest) -> None:
    from .retriever import Retriever

    retriever = Retriever.load(args.dir)
    threshold = float("-inf") if args.no_threshold else None
    try:
        hits = retriever.search(
            args.character, args.query, args.k, prior_weight=args.prior_weight, threshold=threshold
        )
    except (KeyError, ValueError) as err:
        raise SystemExit(f"replugchar retrieve: {err}") from None
    print(f"{args.character} | {args.query!r}")
    print(f"{'rank':>4} {'score':>7} {'sim':>7} {'prior':>7}  setting")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:>4} {h.score:7.3f} {h.similarity:7.3f} {h.prior:7.3f}  {h.setting}")
    if not hits:
        print("  (no setting above the relevance threshold: answer without settings)")


def run_tool(argv: list[str]) -> None:
    if argv[0] == "evaluate":
        from .harness import main

        main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="replugchar", description=__doc__)
    sub = parser.add_subparsers(dest="tool", required=True)
    p = sub.add_parser("score", help="precompute frozen-LM scores into the persistent cache")
    p.add_argument("--split", choices=("train", "val", "all"), default="all")
    p.add_argument("--chunk", type=int, default=64, help="pairs per cache flush")
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("priors", help="generality priors: lm-utility | judge | import | fit-weight")
    p.add_argument("method", choices=("lm-utility", "judge", "import", "fit-weight"))
    p.add_argument("--out", required=True)
    p.add_argument("--file", help="import: JSONL/CSV with character_id, setting_id (index or text), score")
    p.add_argument("--judge_lm", help="judge: LM spec (default: model.lm)")
    p.add_argument("--template", help="judge: file with a prompt template containing {setting}")
    p.add_argument("--priors", help="fit-weight: priors.jsonl")
    p.add_argument("--ckpt_path", help="fit-weight: trained checkpoint (default: the config's encoder)")
    p.set_defaults(func=cmd_priors)
    for name, func, help_ in (
        ("index", cmd_index, "rebuild the FAISS index (encoder and/or priors changed)"),
        ("export", cmd_export, "export encoder + index + priors for other RAG stacks"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--out", required=True)
        p.add_argument("--ckpt_path")
        p.add_argument("--priors")
        p.add_argument("--fitted", help="JSON from `priors fit-weight` (prior_weight, threshold)")
        p.add_argument("--prior_weight", type=float)
        p.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat")
        p.set_defaults(func=func)
    p = sub.add_parser("retrieve", help="print a character's top settings for a query")
    p.add_argument("--dir", required=True, help="export folder")
    p.add_argument("--character", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--prior_weight", type=float, default=None, help="λ (default: retriever.json)")
    p.add_argument(
        "--no_threshold", action="store_true", help="list the top k even under the relevance threshold"
    )
    p.set_defaults(func=cmd_retrieve)
    args, rest = parser.parse_known_args(argv)
    if args.tool == "retrieve" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.func(args, rest)
