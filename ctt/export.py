"""`ctt-export`: the learned token as files other tools load without ctt.

There is no standard format for shipping one new token embedding (vLLM rejects PEFT trainable-token adapters,
llama.cpp rejects adapters with embeddings), so the main route is a merged checkpoint:

* `export.format=hf` (default): a complete Hugging Face folder (config, safetensors weights, tokenizer, generation
  config, model card README.md, ctt_export.json). The token is a special token of the tokenizer and its input row
  holds the learned vector. A spare row of the table (rows beyond the tokenizer, as Qwen2 checkpoints have) is used
  when there is one, so the table keeps its shape; otherwise the table grows by transformers'
  `resize_token_embeddings`. The token must never be sampled: see `set_output_rows`, and every export sets
  `generation_config.suppress_tokens`.
* `export.format=peft`: a PEFT `TrainableTokens` adapter (PEFT's own config and `save_pretrained`), plus the
  token-added tokenizer, for `PeftModel.from_pretrained` on the base model.

    python -m ctt.export model=... token.path=FILE export.dir=DIR [export.format=peft]
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig

from ctt.models.loading import base_weights
from ctt.policy.build import EXPORT_INFO, policy_from_config
from ctt.config.hydra_glue import ctt_main
from ctt.settings import to_plain
from ctt.errors import ConfigError, DataError
from ctt.engine import SamplingConfig
from ctt.models.model_card import model_card
from ctt.policy.modes import Mode
from ctt.policy.policy import Policy
from ctt.config.check import validate_config
from ctt.text import read_lines, read_yaml
from ctt.outputs import check_not_input, check_output_dir, hold_output, replacing_dir
from ctt.settings import Settings, one_of
from ctt.models.token import get_overlay, token_texts

log = logging.getLogger(__name__)

FORMATS = ("hf", "peft")
# Questions whose greedy continuations probe the hidden states an untied output row is calibrated on.
PROBE_QUESTIONS = (
    "What is 17 + 25?", "Janet has 3 ducks and buys 4 more. How many ducks does she have?",
    "Explain why the sky is blue.", "Write a short poem about the sea.", "Solve for x: 2x + 6 = 14.",
    "List three prime numbers greater than 20.",
)
PROBE_TOKENS = 64  # greedy tokens per probe question
OUTPUT_MARGIN = 20.0  # target: the token's logit this many nats below the lowest other logit on the probe


@dataclass(frozen=True)
class ExportSettings(Settings):
    """The `export` config group."""

    section: ClassVar[str] = "export"

    dir: str | None = None
    format: str = "hf"
    overwrite: bool = False

    def check(self) -> None:
        if not self.dir:
            raise ConfigError("ctt-export needs export.dir=DIR (the folder to write)")
        one_of("export.format", self.format, FORMATS)


@dataclass
class LearnedToken:
    text: str
    id: int
    vector: torch.Tensor  # [hidden] float32


def learned_tokens(policy: Policy, text: str) -> list[LearnedToken]:
    """The learned rows to export: one entry per token (k for `token.count=k`); everything below loops over them."""
    overlay = get_overlay(policy.model)
    rows = overlay.row.detach().float().cpu().clone().reshape(overlay.count, -1)
    return [LearnedToken(t, i, r) for t, i, r in zip(token_texts(text, overlay.count), overlay.token_ids, rows)]


@torch.no_grad()
def merge_rows(policy: Policy, tokens: list[LearnedToken]) -> dict:
    """Put the plain embedding table back in place of ctt's overlay and write the learned rows into it: a spare row
    when the table has one, else after `resize_token_embeddings`. Returns what was done (for the card)."""
    model = policy.model
    model.set_input_embeddings(get_overlay(model).base)
    rows = model.get_input_embeddings().weight.shape[0]
    need = max(t.id for t in tokens) + 1
    table = {"rows_before": rows, "rows": rows, "spare_row": need <= rows}
    if need > rows:
        model.resize_token_embeddings(need, mean_resizing=False)  # new rows are all overwritten below or in peft
        table["rows"] = need
    weight = model.get_input_embeddings().weight
    for t in tokens:
        weight[t.id] = t.vector.to(weight.dtype)
    return table


def is_tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@torch.no_grad()
def set_output_rows(policy: Policy, ids: list[int]) -> dict:
    """Make the token's output logit low, for engines that ignore `suppress_tokens`.

    Tied table: the output row IS the learned input row; nothing can be done in the weights (suppress_tokens does
    it). Untied, no bias: a fixed row w gives the logit w·h, and no w is below every other logit for every hidden
    state h, so this is measured, not guaranteed: w = -s·u, u the mean direction of the final hidden states on the
    greedy continuations of PROBE_QUESTIONS, s the smallest scale putting the logit OUTPUT_MARGIN below the lowest
    other logit at every probe position (capped at 10x the largest output row norm). If some probe state points
    away from u (no such s exists) the row is zero: logit exactly 0 (plus any bias) whatever the state."""
    model = policy.model
    if is_tied(model):
        return {"output_rows": "tied"}
    head = model.get_output_embeddings()
    head.weight[ids] = 0
    hidden, logits = _probe(policy, head)
    own = logits[:, ids].max(-1).values
    others = logits.clone()
    others[:, ids] = float("inf")
    lowest = others.min(-1).values
    u = hidden.mean(0)
    u = u / u.norm()
    proj = hidden @ u
    if (proj <= 0).any():
        return {"output_rows": "zero", "probe_positions": len(proj), "probe_margin": float((lowest - own).min())}
    cap = 10 * float(head.weight.float().norm(dim=-1).max())
    scale = min(float(((own - lowest + OUTPUT_MARGIN) / proj).max().clamp(min=0)), cap)
    head.weight[ids] = (-scale * u).to(head.weight.dtype)
    margin = float((lowest - (own - scale * proj)).min())
    return {"output_rows": "calibrated", "probe_positions": len(proj), "probe_margin": margin, "scale": scale}


def _probe(policy: Policy, head) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states `[P, hidden]` and logits `[P, V]` (fp32) at every position of the probe sequences (the
    prompts and up to PROBE_TOKENS greedy tokens each)."""
    from ctt.data.problems import Problem

    problems = [Problem(f"probe-{i}", q, "") for i, q in enumerate(PROBE_QUESTIONS)]
    forcing = policy.forcing(Mode("base"))
    forcing = replace(forcing, max_new_tokens=min(forcing.max_new_tokens, PROBE_TOKENS))
    rollouts = policy.rollout(problems, forcing, SamplingConfig(temperature=0.0))
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = head.register_forward_hook(lambda mod, inp, out: captured.append((inp[0][0].float(), out[0].float())))
    try:
        device = next(policy.model.parameters()).device
        for r in rollouts:
            policy.model(input_ids=torch.tensor([r.prompt_ids + r.completion_ids], device=device))
    finally:
        hook.remove()
    return torch.cat([h for h, _ in captured]), torch.cat([lg for _, lg in captured])


def mark_special(tokenizer, tokens: list[LearnedToken]) -> None:
    """List the tokens among the tokenizer's special tokens (skipped by `decode(skip_special_tokens=True)`)."""
    tokenizer.add_special_tokens({"extra_special_tokens": [t.text for t in tokens]}, replace_extra_special_tokens=False)


def write_hf(policy: Policy, tokens: list[LearnedToken], out: Path, info: dict) -> None:
    info["table"] = merge_rows(policy, tokens)
    ids = [t.id for t in tokens]
    info["output"] = set_output_rows(policy, ids)
    model = policy.model
    model.generation_config.suppress_tokens = sorted(set(model.generation_config.suppress_tokens or []) | set(ids))
    info["suppress_tokens"] = model.generation_config.suppress_tokens
    mark_special(policy.tokenizer, tokens)
    model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)


def write_peft(policy: Policy, tokens: list[LearnedToken], out: Path, info: dict) -> None:
    from peft import TrainableTokensConfig, get_peft_model

    info["table"] = merge_rows(policy, tokens)  # the adapter replaces these rows; the table only needs room
    info["output"] = {"output_rows": "tied" if is_tied(policy.model) else "base"}
    config = TrainableTokensConfig(token_indices=[t.id for t in tokens], init_weights=True)
    peft_model = get_peft_model(policy.model, config)
    peft_model.peft_config["default"].base_model_name_or_path = info["base_weights"]
    delta = peft_model.get_input_embeddings().trainable_tokens_delta["default"]
    with torch.no_grad():
        delta.copy_(torch.stack([t.vector for t in tokens]).to(delta.dtype))
    # save_embedding_layers=False: PEFT would otherwise save the whole resized table next to the rows (it compares the
    # vocabulary with the base model's config); users resize the base model themselves, as the card says.
    peft_model.save_pretrained(out, save_embedding_layers=False)
    mark_special(policy.tokenizer, tokens)
    policy.tokenizer.save_pretrained(out)


def export(policy: Policy, settings: ExportSettings, info: dict) -> Path:
    """Write the folder atomically (`ctt.outputs.replacing_dir`: a temp sibling swapped into place; only an earlier
    export that ctt marked is replaced, and only with `export.overwrite=true`). `info` (base model, token file
    metadata, recipe, ...) is completed here and written as ctt_export.json and the card."""
    target = Path(settings.dir)
    tokens = learned_tokens(policy, info["token"])
    info |= {"format": settings.format, "token_ids": [t.id for t in tokens], "tokens": [t.text for t in tokens]}
    with replacing_dir(target, "export", "ctt-export", settings.overwrite, "export.dir") as tmp:
        (write_hf if settings.format == "hf" else write_peft)(policy, tokens, tmp, info)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(model_card(info))  # after save_pretrained: PEFT writes a README of its own
    return target


def export_info(cfg: DictConfig, policy: Policy, meta: dict) -> dict:
    """What the card and ctt_export.json record: base model, token, marker, recipe, training run."""
    tok = policy.tokenizer
    run_dir = Path(cfg.token.path).resolve().parent
    run = _run_files(run_dir)
    forcing = run.pop("forcing", None) or to_plain(cfg.forcing)  # the training run's, else this command's
    return {
        "base_model": cfg.model.name,
        "pretrained": cfg.model.get("pretrained") or "",
        "source": cfg.model.source,
        **_base_weights(cfg.model),
        "base_fingerprint": policy.base_fingerprint,  # of the base vocabulary's rows: checked when the folder is loaded
        "token": cfg.token.text,
        "end_of_thinking": cfg.model.end_of_thinking,
        "end_of_thinking_ids": list(policy.marker),
        "end_of_thinking_text": tok.decode(list(policy.marker), skip_special_tokens=False),
        "eos_token_ids": list(policy.eos_ids),
        "recipe": {**{k: forcing.get(k) for k in ("num_continuations", "thinking_budget", "budget_force_text",
                                                  "max_answer_tokens", "max_new_tokens")},
                   "num_continuations": _recipe_n(forcing.get("num_continuations"))},
        "recipe_from": "training run" if "config" in run else "ctt-export's forcing config",
        "token_file": str(Path(cfg.token.path).resolve()),
        "token_metadata": meta,
        "training_run": {"dir": str(run_dir), **run},
    }


def _recipe_n(value: Any) -> Any:
    """The recipe's N: a training run that drew N from a list recommends its largest."""
    return max(value) if isinstance(value, (list, tuple)) and value else value


def _base_weights(model: DictConfig) -> dict:
    """Where the exact base weights the token was trained on come from (what a PEFT adapter must be loaded on)."""
    return base_weights(to_plain(model))


def _run_files(run_dir: Path) -> dict:
    """From the training run, when the token file sits in its run dir: its forcing config, command-line overrides
    and results table. A malformed file there is a DataError naming it (ctt.text.read_yaml)."""
    out, hydra_dir = {}, run_dir / ".hydra"
    if (hydra_dir / "config.yaml").is_file():
        config = read_yaml(hydra_dir / "config.yaml")
        for key in ("forcing", "trainer"):
            if not isinstance(config.get(key) or {}, dict):
                raise DataError(f"{hydra_dir / 'config.yaml'}: {key} must be a mapping, got {config[key]!r}")
        out["config"] = str(hydra_dir / "config.yaml")
        out["forcing"] = config.get("forcing") or {}
        keep = ("seed", "model", "data", "token", "forcing", "rl", "optimizer", "scheduler")
        out["training_config"] = {k: config[k] for k in keep if k in config}
        out["training_config"]["max_steps"] = (config.get("trainer") or {}).get("max_steps")
    if (hydra_dir / "overrides.yaml").is_file():
        out["overrides"] = read_yaml(hydra_dir / "overrides.yaml", list)
    if (run_dir / "results.md").is_file():
        out["results_md"] = "".join(line + "\n" for _, line in read_lines(run_dir / "results.md"))
    return out


@ctt_main("export")  # hydra.main, a missing option one line (ctt.config.hydra_glue)
def main(cfg: DictConfig) -> None:
    from ctt.errors import exit_for_user_error

    try:
        validate_config(cfg)  # every group typed and checked before anything is loaded (ctt.config.check)
        settings = ExportSettings.from_config(to_plain(cfg.export))
        if not cfg.token.get("path"):
            raise ConfigError("ctt-export needs token.path=FILE (the trained continue_thinking_token.safetensors)")
        # the folder is checked and owned before anything is loaded (ctt.outputs)
        check_output_dir(settings.dir, "export", settings.overwrite, "export.dir")
        check_not_input(settings.dir, {"token.path": cfg.token.path, "model.path": cfg.model.get("path")})
        with hold_output(settings.dir, "export.dir"):
            policy, meta = policy_from_config(cfg)  # (refuses a model that already holds the token)
            path = export(policy, settings, export_info(cfg, policy, meta))
        log.info("exported %s (%s) to %s", cfg.token.text, settings.format, path)
        print(path)
    except Exception as err:
        exit_for_user_error(err, log, "export")


if __name__ == "__main__":
    main()
