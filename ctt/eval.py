"""`ctt-eval`: accuracy of base / fixed-word / learned-token forcing for each N.

Writes into the run dir (`${paths.output_dir}`): results.csv / results.md (pass@1 with its 95% CI per benchmark,
mode and N), samples.jsonl (one record per sample; `ctt.evaluate.results_from_samples` recomputes the table from
it) and scaling.png (accuracy against mean thinking tokens, `ctt.plots.scaling_plot`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from ctt.comparisons import compare, comparisons_markdown
from ctt.config import CONFIG_DIR, load_benchmarks, to_plain
from ctt.data import DEFAULT_INSTRUCTION, Problem, load_problems
from ctt.evaluate import RESULT_COLUMNS, evaluate, markdown_table, write_results
from ctt.generation import SamplingConfig
from ctt.models import load_model
from ctt.modes import baseline_labels, expand_modes
from ctt.plots import deltas_plot, scaling_plot
from ctt.policy import ForcingSettings, Policy
from ctt.rewards import get_reward_fn
from ctt.schema import validate_config
from ctt.token import install_token, load_token_file

log = logging.getLogger(__name__)


def training_problems(cfg: DictConfig) -> list[Problem] | None:
    """The problems the token was trained on (`data.train`), for the held-out check; None when it is switched off."""
    if not cfg.eval.get("exclude_training_problems", True) or not cfg.get("data") or not cfg.data.get("train"):
        return None
    return load_problems(**to_plain(cfg.data.train))


def evaluate_policy(policy: Policy, cfg: DictConfig, out_dir: Path) -> list[dict]:
    ev = cfg.eval
    modes = expand_modes(list(ev.modes), list(ev.num_continuations), list(ev.fixed_words))
    benchmarks, notes = load_benchmarks(cfg.benchmarks, limit=ev.get("limit"), training=training_problems(cfg))
    for problems in benchmarks.values():  # token text, context length: before the first generation
        policy.check_problems(problems)
    sampling = SamplingConfig(ev.temperature, ev.top_p, seed=cfg.seed)
    reward_fn = get_reward_fn(ev.get("reward", "math_verify"))
    results, records = evaluate(policy, benchmarks, modes, ev.samples, sampling, reward_fn)
    comparisons = compare(records, *baseline_labels(modes))
    path = write_results(out_dir, results, records, notes, comparisons)
    scaling_plot(results, Path(out_dir) / "scaling.png")
    deltas_plot(comparisons, Path(out_dir) / "deltas.png")
    print(markdown_table(results, RESULT_COLUMNS))
    if notes:
        print("\n" + "\n".join(notes))
    print("\n" + comparisons_markdown(comparisons))
    log.info("results written to %s (comparisons.csv, results.md, samples.jsonl, scaling.png, deltas.png)", path)
    return results


def load_policy(cfg: DictConfig) -> Policy:
    """A fresh copy of the base model with the token installed and, if `token.path` is set, the learned row."""
    loaded = load_model(**to_plain(cfg.model))
    overlay = install_token(loaded.model, loaded.tokenizer, to_plain(cfg.token.init), cfg.token.text)
    if cfg.token.get("path"):
        base = None if cfg.token.get("allow_base_mismatch") else cfg.model.name
        embedding, meta = load_token_file(cfg.token.path, overlay.row.shape[0], base)
        overlay.row.data.copy_(embedding)
        log.info("loaded token %s (step %s) from %s", meta.get("token"), meta.get("step"), cfg.token.path)
    elif "learned" in list(cfg.eval.modes):
        log.warning("token.path is not set: mode 'learned' evaluates the untrained initialisation")
    forcing = ForcingSettings.from_config(to_plain(cfg.forcing))
    prompt = to_plain(cfg.prompt)
    return Policy(loaded, forcing, prompt.get("instruction") or DEFAULT_INSTRUCTION, prompt.get("system_prompt"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from ctt.errors import exit_for_user_error

    try:
        validate_config(cfg)  # every group typed and checked before anything is loaded (ctt.schema)
        L.seed_everything(cfg.seed)
        evaluate_policy(load_policy(cfg), cfg, Path(cfg.paths.output_dir))
    except Exception as err:
        exit_for_user_error(err, log, "evaluation")


if __name__ == "__main__":
    main()
