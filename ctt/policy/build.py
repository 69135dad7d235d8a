"""The one factory of a Policy, from the model / token / forcing / prompt config groups (training, ctt-eval,
ctt-export, ctt-generate and the Python API all build it here)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctt.data.problems import PromptSettings
from ctt.errors import ConfigError, DataError, ModelError
from ctt.models.loading import load_model
from ctt.models.token import (MAX_TOKEN_COUNT, TokenSettings, base_fingerprint, check_base_fingerprint, check_row,
                              install_token, load_token_file, token_count, token_texts)
from ctt.outputs import read_marker
from ctt.policy.policy import ForcingSettings, Policy
from ctt.text import read_json
from ctt.settings import to_plain

log = logging.getLogger(__name__)

EXPORT_INFO = "ctt_export.json"  # written by ctt.export


def _export_info(model_cfg: dict) -> dict:
    """The ctt_export.json of a local folder written by ctt-export ({} for any other model)."""
    info = Path(str(model_cfg.get("path") or "")) / EXPORT_INFO
    if model_cfg.get("source") != "local" or not info.is_file():
        return {}
    try:
        found = read_json(info)  # the one JSON reader (ctt.text): unreadable, not UTF-8, garbled, too deep
    except DataError as err:
        raise ModelError(f"{info} is not readable JSON: {err}") from None
    if not isinstance(found, dict) or not found:
        raise ModelError(f"{info} must hold the JSON object ctt-export wrote, got {type(found).__name__} {found!r:.40}")
    _check_export_fields(found, info)
    return found


def _check_export_fields(found: dict, info: Path) -> None:
    """The fields build_policy reads have the types ctt-export writes (a hand-edited file is one line, not a
    TypeError deep in the tokenizer)."""
    tokens = found.get("tokens")
    if tokens is not None and not (isinstance(tokens, list) and 0 < len(tokens) <= MAX_TOKEN_COUNT
                                   and all(isinstance(t, str) and t for t in tokens)):
        raise ModelError(f"{info}: 'tokens' must be a list of 1 to {MAX_TOKEN_COUNT} token texts, got {tokens!r:.60}")
    for key, kind in (("token_metadata", dict), ("end_of_thinking", str), ("base_fingerprint", str)):
        if found.get(key) is not None and not isinstance(found[key], kind):
            raise ModelError(f"{info}: '{key}' must be a {'JSON object' if kind is dict else 'string'}, got "
                             f"{found[key]!r:.60}")


def _model_config(model_cfg: dict, exported: dict) -> dict:
    """A folder written by ctt-export records its end-of-thinking marker: `end_of_thinking: null` reads it there."""
    if model_cfg.get("end_of_thinking") is None:
        if "end_of_thinking" not in exported:
            raise ConfigError("model.end_of_thinking is not set (and model.path has no ctt_export.json to read)")
        model_cfg = {**model_cfg, "end_of_thinking": exported["end_of_thinking"]}
    return model_cfg


def _refuse_unverified_export(loaded, model_cfg: dict, text: str | None) -> None:
    """A model that carries ctt's tokens (an exported folder: its `.ctt-output.json` says so, or its tokenizer holds
    `text` or a numbered `text-i`) without its ctt_export.json cannot be checked against the weights its rows were
    trained on, nor told how many rows it holds: refused, never used as "learned" (or given a fresh token). `text`
    None (training): install_token refuses a text the tokenizer already holds, with its own message."""
    path = model_cfg.get("path")
    marker = read_marker(Path(path)) if model_cfg.get("source") == "local" and path else None
    ours = {text, *token_texts(text, MAX_TOKEN_COUNT)} if text else set()
    carried = sorted(set(loaded.tokenizer.get_added_vocab()) & ours)
    if carried or (marker or {}).get("kind") == "export":
        why = f"holds the token(s) {', '.join(carried)}" if carried else "is a folder written by ctt-export"
        source = path or model_cfg.get("pretrained")
        raise ModelError(f"model {model_cfg['name']}{f' ({source})' if source else ''} {why} but has no "
                         f"{EXPORT_INFO}, so no learned row of it can be checked against the weights it was trained "
                         f"on; restore {EXPORT_INFO}, export the token file again or choose another token.text")


def build_policy(
    model: Mapping[str, Any], token: Mapping[str, Any], forcing: Mapping[str, Any], prompt: Mapping[str, Any] | None,
    *, trainable: bool = False,
) -> tuple[Policy, dict | None]:
    """The model with its token, and the token's metadata. `trainable` (training): ctt's overlay with the untrained
    initialisation, whatever `token.path` says. Otherwise a base model gets the overlay with the row of `token.path`
    (metadata None without a file), and a model whose tokenizer already holds the token (a ctt-export folder) is used
    as it is."""
    model_cfg = to_plain(model)
    exported = _export_info(model_cfg)
    loaded = load_model(**_model_config(model_cfg, exported))
    tok = TokenSettings.from_config(token)
    if not exported:
        _refuse_unverified_export(loaded, model_cfg, None if trainable else tok.text)
    texts = exported.get("tokens") or token_texts(tok.text, tok.count)  # an exported folder says how many it holds
    token_ids, meta = None, None
    vocab = loaded.tokenizer.get_vocab()  # built anew by every call (151k entries for Qwen2): once here
    held = texts[0] in vocab
    missing = [t for t in texts if t not in vocab]
    if exported and missing:
        # a ctt_export.json beside weights that do not hold its tokens (written or copied by hand): evaluating it
        # would give a fresh, untrained row as "learned"
        raise ModelError(f"{Path(str(model_cfg.get('path')))} has a {EXPORT_INFO} naming the token {missing[0]!r}, "
                         "but its tokenizer does not hold it: not a folder ctt-export wrote; export the token file "
                         "again")
    # the base vocabulary's rows: an exported folder's learned rows (the last ids) are left out
    loaded.fingerprint = base_fingerprint(loaded.model, min(loaded.tokenizer.convert_tokens_to_ids(texts)) if held
                                          else len(loaded.tokenizer))
    if trainable:
        install_token(loaded.model, loaded.tokenizer, tok.init, tok.text, tok.count)
    elif held:
        if tok.path:
            raise ConfigError(f"model {model_cfg['name']} already holds the token {tok.text!r} (an exported "
                              "folder?); drop token.path")
        token_ids = tuple(loaded.tokenizer.convert_tokens_to_ids(texts))
        where = f"exported folder {model_cfg.get('path')}"
        check_base_fingerprint(exported.get("base_fingerprint"), loaded.fingerprint, where, tok.allow_base_mismatch,
                               ModelError)
        # the token file's metadata (training data for ctt-eval's held-out check, step, init), as with a token file
        meta = {**(exported.get("token_metadata") or {}), "exported_from": str(Path(model_cfg.get("path") or "."))}
    else:
        meta = _install_learned(loaded, tok, model_cfg["name"], len(texts))
    prompt_settings = PromptSettings.from_config(prompt)
    policy = Policy(loaded, ForcingSettings.from_config(forcing), prompt_settings.text, prompt_settings.system_prompt,
                    token_ids=token_ids)
    return policy, meta


def _install_learned(loaded, tok: TokenSettings, base_model: str, count: int) -> dict | None:
    """The overlay with the row of `token.path` (a file of k rows installs k tokens under the default token.count=1;
    any other token.count must be the file's), or the untrained initialisation without a file; the file's metadata
    (None without one)."""
    embedding, meta = None, None
    if tok.path:  # its rows fit the model's width, and token.count unless that is the default
        hidden = loaded.model.get_input_embeddings().weight.shape[-1]
        embedding, meta = load_token_file(tok.path, hidden, None if tok.allow_base_mismatch else base_model,
                                          None if tok.count == 1 else tok.count)
        check_base_fingerprint(meta.get("base_fingerprint"), loaded.fingerprint, f"token file {tok.path}",
                               tok.allow_base_mismatch)
    overlay = install_token(loaded.model, loaded.tokenizer, tok.init, tok.text,
                            count if embedding is None else token_count(embedding))
    if embedding is not None:
        check_row(embedding, overlay.base.weight, f"token file {tok.path}")
        overlay.row.data.copy_(embedding)
        log.info("loaded token %s (step %s) from %s", meta.get("token"), meta.get("step"), tok.path)
    return meta


def policy_from_config(cfg) -> tuple[Policy, dict | None]:
    """`build_policy` from a composed config (ctt-eval, ctt-export, ctt-generate, the Python API)."""
    return build_policy(cfg.model, cfg.token, cfg.forcing, cfg.get("prompt"))
