"""The vLLM engine: budget-forced rollouts sampled by vLLM, with the records of ctt's engine.

vLLM has no way to *replace* a sampled token inside its loop, so the forcing loop is written here, on vLLM's own
mechanisms: each row runs ctt's state machine (ctt.engine.forcing) over segments that vLLM samples. A segment
stops where the state machine must act: at a stop token (the marker's last token, an end-of-sequence id; both
`stop_token_ids`) or at the next token limit (`max_tokens` = `segment_limit`). Its tokens go through `advance` one
by one; where forcing replaces a marker, the row is resubmitted as prompt + completion (the marker dropped, the
continuation appended) and vLLM's prefix caching makes the shared prefix nearly free. Requests are fed to vLLM's
engine loop (`LLMEngine.add_request` / `step`), so a row is resubmitted the moment its segment ends while the others
keep decoding (continuous batching across forced continuations).

Sampling matches ctt's loss pass (ctt.rl): temperature, then top-p, over the logits with the banned ids (the
learned tokens) removed through `allowed_token_ids` (an exact mask; `logit_bias` is clamped to -100). Each segment
has its own seed, `mix_seed(row seed, segment)`, so a row's rollout is a function of its seed alone. "No string"
bans the marker's first token at one sample: a one-token segment without it.

The learned rows live in rows of vLLM's input table, written in place after each optimizer step (`sync_rows`,
`LLM.apply_model`): k x hidden floats, not the full weight sync other trainers do.
"""

from __future__ import annotations

import functools
import itertools
import shutil
import time

import torch

from ctt.engine.base import RolloutEngine, register_engine
from ctt.engine.batching import banned_in_vocab
from ctt.engine.forcing import ANSWER, DONE, RowState, advance, segment_limit
from ctt.engine.records import ForcingConfig, Rollout, SamplingConfig, mix_seed, row_seeds
from ctt.engine.settings import EngineSettings
from ctt.engine.vllm_model import build_llm
from ctt.errors import ConfigError

MIN_TEMPERATURE = 0.01  # vLLM's floor for a sampling temperature (SamplingParams)


def _input_table(model) -> torch.Tensor:
    """vLLM's input-embedding table (`...embed_tokens`, a VocabParallelEmbedding; one shard: the whole table)."""
    for name, module in model.named_modules():
        if name.endswith("embed_tokens"):
            return module.weight.data
    raise RuntimeError(f"no embed_tokens module in vLLM's {type(model).__name__}")  # pragma: no cover


def _write_rows(model, ids: list[int], rows: torch.Tensor) -> None:
    """Runs inside vLLM (`apply_model`): the learned rows into its input table, in place."""
    table = _input_table(model)
    table[ids] = rows.to(device=table.device, dtype=table.dtype)


def _read_rows(model, ids: list[int]) -> torch.Tensor:
    return _input_table(model)[ids].float().cpu().clone()


@register_engine
class VLLMEngine(RolloutEngine):
    kind = "vllm"

    def __init__(self, settings: EngineSettings, model, token_ids: tuple[int, ...] = (), seed: int = 0,
                 cache_dir: str | None = None, rows=None, **_):
        """`model`: ctt's frozen model (its weights are what vLLM loads); `token_ids`: the learned ids; `rows`: a
        callable returning their current `[hidden]` or `[k, hidden]` values (None: they are rows of `model`'s
        own weights, as in a folder written by ctt-export)."""
        super().__init__(settings)
        self.token_ids = list(token_ids)
        self._rows = rows  # None: the rows are already in the weights (an exported folder); nothing to push
        need = max(self.token_ids) + 1 if self.token_ids else 0
        self.llm, self._written = build_llm(model, settings, need, seed, cache_dir)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self._pushed: torch.Tensor | None = None
        self._ids = itertools.count()

    # --- the learned rows ---------------------------------------------------------------------------------------

    def sync_rows(self, force: bool = False) -> float | None:
        """Write the learned rows into vLLM's table if they changed since the last push; the seconds it took."""
        if not self.token_ids or self._rows is None:
            return None
        rows = self._rows().detach()
        if rows.numel() == 0:  # ZeRO-3 outside its gather: the full row is not here (the next rollout pushes it)
            return None
        self.last_sync_seconds = None
        rows = rows.float().cpu().reshape(len(self.token_ids), -1)
        if not force and self._pushed is not None and torch.equal(rows, self._pushed):
            return None
        self._wake()  # a sleeping engine's weights are offloaded: a write there would be lost on wake
        start = time.perf_counter()
        self.llm.apply_model(functools.partial(_write_rows, ids=self.token_ids, rows=rows.clone()))
        # Cached KV blocks are keyed by token ids alone: blocks after a learned token hold the old row's KV.
        self.llm.reset_prefix_cache()
        self._pushed = rows.clone()
        self.last_sync_seconds = time.perf_counter() - start
        return self.last_sync_seconds

    def table_rows(self) -> torch.Tensor:
        """vLLM's current rows for the learned ids (fp32), for tests and checks."""
        return self.llm.apply_model(functools.partial(_read_rows, ids=self.token_ids))[0]

    # --- rollouts -----------------------------------------------------------------------------------------------

    def generate(self, prompts, forcing, sampling, seeds=None, on_token=None) -> list[Rollout]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self._wake()
        self.sync_rows()
        seeds = row_seeds(sampling.seed, len(prompts)) if seeds is None else seeds
        rows = [RowState(Rollout(prompt_ids=list(p))) for p in prompts]
        allowed = self._allowed(forcing.banned_ids)
        engine = self.llm.llm_engine
        pending: dict[str, int] = {}  # request id -> row
        segments = [0] * len(rows)

        def submit(i: int) -> None:
            params = self._params(rows[i], forcing, sampling, allowed, seeds, i, segments[i])
            request = f"ctt-{next(self._ids)}"  # outputs carry this id (add_request returns an internal one)
            engine.add_request(request, _prompt(rows[i].rollout), params)
            pending[request] = i
            segments[i] += 1

        for i in range(len(rows)):
            submit(i)
        while pending:
            for out in engine.step():
                if not out.finished or out.request_id not in pending:
                    continue
                i = pending.pop(out.request_id)
                _consume(rows[i], out.outputs[0].token_ids, forcing, None if on_token is None else
                         functools.partial(on_token, i))
                if rows[i].phase != DONE:
                    submit(i)
        return [r.rollout for r in rows]

    def _allowed(self, banned_ids) -> list[int] | None:
        banned = set(banned_in_vocab(banned_ids, self.vocab_size))
        return None if not banned else [t for t in range(self.vocab_size) if t not in banned]

    def _params(self, row: RowState, forcing: ForcingConfig, sampling: SamplingConfig, allowed, seeds, i, segment):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        suppress, row.suppress = row.suppress, None
        if suppress is not None:  # "no string": one sample without the marker's first token
            allowed = [t for t in (allowed if allowed is not None else range(self.vocab_size)) if t != suppress]
        greedy = sampling.temperature <= 0
        if 0 < sampling.temperature < MIN_TEMPERATURE:
            raise ConfigError(f"engine=vllm samples at temperatures >= {MIN_TEMPERATURE} (vLLM raises smaller ones "
                              f"to it, while the loss would score the given one); got {sampling.temperature}")
        stops = sorted({forcing.end_of_thinking_ids[-1], *forcing.eos_token_ids}) if row.phase != ANSWER else \
            sorted(set(forcing.eos_token_ids))
        return SamplingParams(
            temperature=0.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            seed=None if greedy or seeds is None else mix_seed(seeds[i], segment),
            max_tokens=1 if suppress is not None else segment_limit(row, forcing),
            stop_token_ids=stops, ignore_eos=True, allowed_token_ids=allowed, detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def release_memory(self) -> None:
        """Sleep level 1 (GPU only): KV cache freed, weights offloaded, so the loss pass has the memory; the next
        rollout wakes it (vllm's sleep mode, as TRL's colocate mode uses it)."""
        if self.settings.sleep_between_rollouts and torch.cuda.is_available():
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if getattr(self, "_asleep", False):
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        self.llm = None
        if self._written is not None:
            shutil.rmtree(self._written, ignore_errors=True)
            self._written = None


def _prompt(rollout: Rollout):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=rollout.prompt_ids + rollout.completion_ids)


def _consume(row: RowState, tokens, forcing: ForcingConfig, on_token) -> None:
    """Hand a segment's sampled tokens to the state machine until it acts (a marker replaced, thinking ended, a
    limit, the end); then feed what it forces. Tokens after that point were sampled from a context the rollout
    does not have: they are dropped (vLLM stopped there anyway, except after a false stop of a multi-token marker)."""
    for token in tokens:
        phase, forced = row.phase, row.rollout.num_forced
        advance(row, int(token), True, forcing)
        if on_token is not None:
            on_token(row.rollout)
        if row.phase != phase or row.rollout.num_forced != forced or row.queue or row.suppress is not None:
            break
    while row.queue and row.phase != DONE:
        advance(row, row.queue.pop(0), False, forcing)
        if on_token is not None:
            on_token(row.rollout)
