"""`python -m ctt.organism` / `ctt-organism`: train the model organism from scratch, save it, measure its card.

    python -m ctt.organism                              # -> outputs/organism (the shipped one is untouched)
    python -m ctt.organism --out ctt/organism/model     # regenerate the shipped model and card
    python -m ctt.organism --steps 60 --no-measure      # a short schedule (the test)
    python -m ctt.organism --task r1 --out ctt/organism/model_r1   # the second organism (model=organism_r1)
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

from ctt.config.check import MAX_SEED
from ctt.settings import require_size
from ctt.errors import CttError, ModelError, exit_for_user_error, guard_closed_stdout
from ctt.organism.card import write_card
from ctt.organism.task import Mixture, assistant_text, make_trace, question_text
from ctt.organism.task_r1 import MixtureR1
from ctt.organism.tokenizer import THINK, THINK_END
from ctt.organism.train import Architecture, TrainSettings, save, train
from ctt.outputs import check_output_dir, hold_output, replacing_dir, write_marker

log = logging.getLogger("ctt.organism")
TASKS = {"hasty": Mixture, "r1": MixtureR1}  # the task/mixture of each organism: model=organism, model=organism_r1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainSettings()
    p = argparse.ArgumentParser(prog="ctt-organism", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/organism", help="folder for the model, tokenizer and card")
    p.add_argument("--task", choices=sorted(TASKS), default="hasty",
                   help="hasty: today's organism (model=organism); r1: organism_r1, traces shaped like R1's")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--steps", type=int, default=defaults.steps, help="training steps (the schedule's length)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (1 is fastest here)")
    p.add_argument("--no-measure", action="store_true", help="skip the card's measurement (1-2 minutes)")
    p.add_argument("--measure-only", action="store_true",
                   help="do not train: re-measure the model already in --out and rewrite its card")
    return p.parse_args(argv)


MAX_ORGANISM = {"steps": 10**6, "batch_size": 1 << 16, "threads": 1024}  # far above the shipped 60-step schedule


def check_args(args: argparse.Namespace) -> None:
    """The numbers' ranges: a ConfigError line (main prints it, exit 2), not argparse's usage block."""
    require_size(args.seed, "--seed", 0, MAX_SEED)
    for name, high in MAX_ORGANISM.items():
        require_size(getattr(args, name), f"--{name.replace('_', '-')}", 1, high)


def model_facts(model, tokenizer, out: Path) -> dict:
    arch = model.config
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": asdict(Architecture(
            hidden_size=arch.hidden_size, num_layers=arch.num_hidden_layers, num_heads=arch.num_attention_heads,
            num_kv_heads=arch.num_key_value_heads, intermediate_size=arch.intermediate_size,
            max_position_embeddings=arch.max_position_embeddings,
            rope_theta=float(arch.rope_parameters["rope_theta"]) if getattr(arch, "rope_parameters", None)
            else float(arch.rope_theta),
            tie_word_embeddings=bool(arch.tie_word_embeddings),
        )),
        "tokenizer_size": len(tokenizer),
        "embedding_rows": model.get_input_embeddings().weight.shape[0],
        "special_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_added_vocab()},
        "weights_bytes": (out / "model.safetensors").stat().st_size,
    }


def load_seconds(out: Path) -> float:
    from ctt.models.loading import load_model

    start = time.perf_counter()
    load_model(name="organism", source="local", path=str(out), end_of_thinking=THINK_END)
    return round(time.perf_counter() - start, 2)


def example_trace(task: str = "hasty") -> str:
    """A full trace with a confirming check after the final step (the card's illustration)."""
    if task == "r1":  # a re-check of the last step after the conclusion, then the conclusion restated
        mix = replace(MixtureR1(), p_error=0, p_slip=0, p_confirm=0, p_stop_plain=0, p_stop_cue=0, p_restate=0,
                      p_recheck_last=1)
        trace = mix.trace((3, 5, 2, 7), random.Random(0))
    else:
        mix = replace(Mixture(), p_error=0, p_confirm=0, p_stop_plain=0, p_stop_cue=0, p_confirm_final=1)
        trace = make_trace((3, 5, 2, 7), random.Random(0), mix)
    return f"{question_text(trace.terms)}\n{THINK}\n{assistant_text(trace, THINK_END)}"


def measure_for(task: str):
    """The card's measurement of a task's organism."""
    if task == "r1":
        from ctt.organism.measure_r1 import measure
    else:
        from ctt.organism.measure import measure
    return measure


def write_task_card(card: dict, out: Path, markdown: bool = True) -> None:
    """card.json and ORGANISM.md, rendered for the card's task."""
    from ctt.organism.card_r1 import render_r1

    write_card(card, out, markdown, render_r1 if card.get("task") == "r1" else None)


def remeasure(out: Path) -> None:
    """Re-measure the figures of the model in `out` (e.g. after a change to measure.py) and rewrite its card: only
    in a folder ctt-organism wrote (its marker), one writer at a time, the card read by the one bounded JSON
    reader."""
    from ctt.errors import DataError
    from ctt.models.loading import load_model
    from ctt.text import read_json

    what = f"--out {out}: --measure-only re-measures a folder written by ctt-organism"
    if not (out / "card.json").is_file():
        raise ModelError(f"{what}, and it has no card.json")
    with hold_output(out, "--out"):
        check_output_dir(out, "organism", True, "--out")  # ctt-organism's own folder, only files it wrote
        try:
            card = read_json(out / "card.json")
        except DataError as err:
            raise ModelError(f"{what}; its card.json cannot be read: {err}") from None
        task = card.get("task", "hasty") if isinstance(card, dict) else None
        if task not in TASKS:
            raise ModelError(f"{what}; its card.json is not an organism card (a JSON object whose task is one of "
                             f"{', '.join(sorted(TASKS))})")
        loaded = load_model(name="organism", source="local", path=str(out), end_of_thinking=THINK_END)
        card["figures"] = measure_for(task)(loaded.model, loaded.tokenizer)
        write_task_card(card, out)
        write_marker(out, "organism", "ctt-organism")  # ORGANISM.md is new after a --no-measure training


def train_into(args: argparse.Namespace, out: Path) -> dict:
    """Train, save the model into the (empty) folder `out` and write its card there; returns the card."""
    settings = replace(TrainSettings(), seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                       threads=args.threads, mixture=TASKS[args.task]())
    model, tokenizer, record = train(settings)
    save(model, tokenizer, str(out))
    log.info("trained in %.0f s (%d tokens/s)", record["seconds"], record["tokens_per_s"])
    card = {
        "task": args.task,
        "model": model_facts(model, tokenizer, out),
        "mixture": settings.mixture.as_dict(),
        "training": record,
        "load_seconds": load_seconds(out),
        "example_trace": example_trace(args.task),
        "figures": None,
    }
    if not args.no_measure:  # else card.json with the training record only, no ORGANISM.md
        if args.task == "r1":
            from ctt.organism.measure_r1 import TEST, VAL, pretraining_overlap

            card["pretraining_overlap"] = pretraining_overlap(settings, {"val": VAL, "test": TEST})
        card["figures"] = measure_for(args.task)(model, tokenizer)
    write_task_card(card, out, markdown=not args.no_measure)
    return card


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    guard_closed_stdout()  # a log line to a closed stdout is dropped, not a wall (ctt.errors)
    try:
        check_args(args)
        if args.measure_only:
            return remeasure(out)
        # a new folder, or one ctt-organism wrote (and only its files): written beside it and swapped in whole, so
        # no card file of the previous model survives (ctt.outputs)
        with replacing_dir(out, "organism", "ctt-organism", True, "--out") as tmp:
            card = train_into(args, tmp)
    except CttError as err:  # a missing, incomplete or foreign folder: one line, exit 2
        exit_for_user_error(err, log, "ctt-organism")
    log.info("saved to %s", out)
    if card["figures"] is not None:
        base = card["figures"]["held_out"]["base"]
        log.info("card written to %s: base %.1f%%, early stop %.1f%%", out / "ORGANISM.md", 100 * base["accuracy"],
                 100 * base["early_share"])


if __name__ == "__main__":
    main()
