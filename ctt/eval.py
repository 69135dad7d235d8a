"""`ctt-eval`: accuracy of base / fixed-word / learned-token forcing for each N.

Writes into the run dir (`${paths.output_dir}`): results.csv / results.md (pass@1 with its 95% CI per benchmark,
mode and N), samples.jsonl (one record per sample; `ctt.evaluation.results.results_from_samples` recomputes the table from
it) and scaling.png (accuracy against mean thinking tokens, `ctt.evaluation.plots.scaling_plot`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from ctt.config.check import check_problem_set, validate_config
from ctt.config.hydra_glue import ctt_main
from ctt.data.problems import Problem
from ctt.errors import ConfigError, CttError, DataError, TokenFileError
from ctt.data.sources import load_benchmarks, load_problems
from ctt.evaluation.comparisons import compare, comparisons_markdown
from ctt.evaluation.plots import deltas_plot, scaling_plot
from ctt.evaluation.results import RESULT_COLUMNS, evaluate, markdown_table, write_results
from ctt.evaluation.settings import EvalSettings
from ctt.outputs import atomic_write_bytes
from ctt.engine import SamplingConfig
from ctt.policy.build import policy_from_config
from ctt.policy.modes import baseline_labels
from ctt.policy.policy import Policy
from ctt.text import parse_json
from ctt.settings import to_plain

log = logging.getLogger(__name__)


def training_problems(cfg: DictConfig, token_meta: dict | None = None) -> list[Problem] | None:
    """The problems the token was trained on, for the held-out check (None when `eval.exclude_training_problems` is
    off): the training data recorded in its token file, else this config's `data.train` (with a warning when a
    token file is loaded that does not record it)."""
    if not EvalSettings.from_config(cfg.eval).exclude_training_problems:
        return None
    if token_meta and token_meta.get("train_data"):
        where = (f"token file {cfg.token.path}" if cfg.get("token") and cfg.token.get("path")
                 else f"exported folder {token_meta.get('exported_from')}")
        spec = recorded_training_data(token_meta["train_data"], where)
        try:
            return load_problems(**spec)
        except CttError as err:  # a data file that moved, ...: name the file that points there
            raise TokenFileError(f"{where}: the training data it records cannot be loaded: {err}") from None
    if not cfg.get("data") or not cfg.data.get("train"):
        return None
    if token_meta is not None:
        log.warning("the token file does not record its training data: the held-out check uses data.train of this "
                    "config (%s)", to_plain(cfg.data.train))
    return load_problems(**to_plain(cfg.data.train))


def recorded_training_data(text: str, where: str) -> dict:
    """The `train_data` metadata of a token file (data.train of its run, as JSON) parsed like a config's problem set:
    a mapping of `load_problems` keywords of the right types and a bounded size; one TokenFileError naming `where`
    (the file) otherwise. It is data from a file, so nothing in it is trusted more than a config."""
    try:
        spec = parse_json(text, f"{where}: its train_data metadata")  # the one JSON reader (ctt.text)
    except DataError as err:
        raise TokenFileError(str(err)) from None
    try:
        return check_problem_set(spec, "train_data")
    except ConfigError as err:
        raise TokenFileError(f"{where}: its train_data metadata is unusable: {err}") from None


def evaluate_policy(policy: Policy, cfg: DictConfig, out_dir: Path, token_meta: dict | None = None) -> list[dict]:
    ev = EvalSettings.from_config(cfg.eval)
    modes = ev.runs
    training = training_problems(cfg, token_meta)
    benchmarks, notes = load_benchmarks(cfg.benchmarks, limit=ev.limit, training=training, part=ev.split,
                                        val_fraction=ev.val_fraction, split_seed=ev.split_seed)
    for problems in benchmarks.values():  # token text, context length: before the first generation
        policy.check_problems(problems)
    sampling = SamplingConfig(ev.temperature, ev.top_p, seed=cfg.seed)
    results = _evaluate_into(Path(out_dir), policy, benchmarks, modes, ev.samples, sampling, ev.reward_fn, notes)
    if ev.also_temperature is not None:  # e.g. the training temperature: pass@1 over eval.also_samples
        again = SamplingConfig(ev.also_temperature, ev.top_p, seed=cfg.seed)
        note = f"sampled at temperature {ev.also_temperature}, top_p {ev.top_p}, {ev.also_samples} samples per problem"
        _evaluate_into(Path(out_dir) / SAMPLED_DIR, policy, benchmarks, modes, ev.also_samples, again, ev.reward_fn,
                       [*notes, note])
    return results


SAMPLED_DIR = "sampled"  # the second evaluation of eval.also_temperature, inside the run dir


def _evaluate_into(out_dir: Path, policy, benchmarks, modes, samples, sampling, reward_fn, notes) -> list[dict]:
    results, records = evaluate(policy, benchmarks, modes, samples, sampling, reward_fn)
    comparisons = compare(records, *baseline_labels(modes))
    path = write_results(out_dir, results, records, notes, comparisons)
    scaling_plot(results, out_dir / "scaling.png")
    deltas_plot(comparisons, out_dir / "deltas.png")
    print(f"\n[{out_dir}] temperature {sampling.temperature}, {samples} sample(s) per problem")
    print(markdown_table(results, RESULT_COLUMNS))
    if notes:
        print("\n" + "\n".join(notes))
    print("\n" + comparisons_markdown(comparisons))
    log.info("results written to %s (comparisons.csv, results.md, samples.jsonl, scaling.png, deltas.png)", path)
    return results


def load_policy(cfg: DictConfig) -> tuple[Policy, dict | None]:
    """A fresh copy of the base model with the token installed and, if `token.path` is set, the learned row (and the
    token file's metadata); or a folder written by ctt-export (`model=exported model.path=DIR`) as it is."""
    policy, meta = policy_from_config(cfg)
    if meta is None and "learned" in EvalSettings.from_config(cfg.eval).modes:
        log.warning("token.path is not set: mode 'learned' evaluates the untrained initialisation")
    return policy, meta


def record_token_count(cfg: DictConfig, policy: Policy) -> None:
    """A token file of k rows evaluated under the default token.count=1 installs k tokens: the run's
    `.hydra/config.yaml` then records token.count=k, so that ctt-report labels the run by what it evaluated."""
    count = len(policy.token_ids)
    if not cfg.get("token") or cfg.token.get("count", 1) == count:
        return
    saved = Path(cfg.paths.output_dir) / ".hydra" / "config.yaml"
    log.warning("token.count=%s, but the token file holds %d learned tokens: evaluating %d (recorded as token.count=%d "
                "in %s)", cfg.token.get("count", 1), count, count, count, saved)
    if saved.is_file():
        config = OmegaConf.load(saved)
        OmegaConf.update(config, "token.count", count, force_add=True)
        atomic_write_bytes(OmegaConf.to_yaml(config).encode(), saved)


@ctt_main("eval")  # hydra.main, a missing option one line (ctt.config.hydra_glue)
def main(cfg: DictConfig) -> None:
    from ctt.errors import exit_for_user_error

    try:
        validate_config(cfg)  # every group typed and checked before anything is loaded (ctt.config.check)
        L.seed_everything(cfg.seed)
        policy, meta = load_policy(cfg)
        record_token_count(cfg, policy)
        evaluate_policy(policy, cfg, Path(cfg.paths.output_dir), meta)
    except Exception as err:
        exit_for_user_error(err, log, "evaluation")


if __name__ == "__main__":
    main()
