"""Training robustness: non-finite losses, zero advantages, answerless rollouts, prompts holding the learned token,
per-micro-batch sampling seeds. (Bad input at the command line: tests/test_cli_errors.py.)"""

from __future__ import annotations

import logging

import pytest
import torch
from hydra.utils import instantiate

from ctt.errors import DataError, TrainingError
from ctt.rewards.grading import Score, score_completion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def smoke_cfg(compose_cfg, tmp_path):
    """`smoke_cfg(*overrides)`: experiment=smoke writing into this test's tmp_path."""
    return lambda *overrides: compose_cfg("train", ["experiment=smoke", f"paths.output_dir={tmp_path}", *overrides])


# --- training-time conditions -------------------------------------------------------------------------------------


def _fit(cfg, callbacks=(), max_steps: int | None = None):
    import lightning as L

    from ctt.training.module import build_module

    L.seed_everything(cfg.seed)
    module = build_module(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps or cfg.trainer.max_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.fit(module, datamodule=instantiate(cfg.data))
    return trainer, module


class RowRecorder:
    """Row value after every optimizer step."""

    def __init__(self):
        import lightning as L

        outer = self

        class _CB(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                outer.rows.append(module.token_row.detach().clone())

        self.rows: list[torch.Tensor] = []
        self.callback = _CB()


def test_non_finite_loss_skips_the_step_and_the_run_continues(smoke_cfg, monkeypatch, caplog):
    import ctt.training.module

    real = ctt.training.module.reinforce_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 3) else loss + float("inf") if calls["n"] == 5 else loss

    monkeypatch.setattr(ctt.training.module, "reinforce_loss", sometimes_nan)
    cfg = smoke_cfg("callbacks=none", "logger=none", "rl.max_bad_steps=3")
    recorder = RowRecorder()
    with caplog.at_level(logging.WARNING, logger="ctt.training.module"):
        trainer, module = _fit(cfg, [recorder.callback], max_steps=6)
    assert trainer.global_step == 6 and module.skipped_steps == 3
    rows = recorder.rows
    # Steps 2, 3 and 5 (1-based) were skipped: the row did not move. (A real step may not move it either when no
    # rollout was scored or all advantages were 0, so the real steps are checked through Adam's count below.)
    for step, (before, after) in enumerate(zip(rows, rows[1:]), start=2):
        if step in (2, 3, 5):
            assert torch.equal(before, after), step
    # Adam never saw the skipped steps (no grad): its step count is the number of real steps, 1, 4 and 6.
    state = trainer.optimizers[0].state[module.token_row]
    assert int(state["step"]) == 3
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 3.0
    assert sum("optimizer step skipped" in r.getMessage() for r in caplog.records) == 3


def test_too_many_non_finite_losses_stop_with_a_clear_error(smoke_cfg, monkeypatch):
    import ctt.training.module

    monkeypatch.setattr(ctt.training.module, "reinforce_loss", lambda *a, **k: torch.tensor(float("nan")))
    cfg = smoke_cfg("callbacks=none", "logger=none", "rl.max_bad_steps=2")
    with pytest.raises(TrainingError, match=r"not finite for 2 consecutive steps \(rl.max_bad_steps=2\)"):
        _fit(cfg, max_steps=10)


def test_all_rewards_equal_is_a_zero_gradient_step(smoke_cfg, monkeypatch):
    """Zero advantages: the loss is 0 and the row's gradient exactly 0, never NaN. With Adam, what is true:
    the first such step leaves the row unchanged (zero moments), but after real steps Adam's momentum still
    moves the row on a zero-gradient step (standard Adam; only a non-finite loss skips the optimizer)."""
    import ctt.training.module

    cfg = smoke_cfg("callbacks=none", "logger=none", "optimizer.lr=0.1")
    module = ctt.training.module.build_module(cfg)
    module.reward_fn = lambda rollout, problem: Score(1.0, True, problem.answer, "correct")  # every rollout correct
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = dm.train_problems[:2]
    optimizer = module.configure_optimizers()  # the optimizer training uses, over the row alone
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["params"] == [module.token_row]

    def step(batch) -> torch.Tensor:
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        return loss

    before = module.token_row.detach().clone()
    loss = step(batch)
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert module.token_row.grad is not None and torch.count_nonzero(module.token_row.grad) == 0
    assert torch.equal(module.token_row.detach(), before)  # first step, zero Adam state: unchanged

    module.token_row.grad = torch.ones_like(module.token_row)  # one real step gives Adam momentum
    optimizer.step()
    after_real = module.token_row.detach().clone()
    step(batch)
    assert not torch.equal(module.token_row.detach(), after_real)  # zero grad, yet Adam's momentum moved it
    assert torch.isfinite(module.token_row).all()


def test_rollouts_that_hit_the_length_limit_score_zero_and_are_counted(smoke_cfg):
    cfg = smoke_cfg("callbacks=none", "logger=none", "forcing.max_new_tokens=2",
                   "forcing.num_continuations=0")
    seen = []
    import lightning as L

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.extend(module.last_samples)

    trainer, _ = _fit(cfg, [Spy()], max_steps=1)
    cut = [(p, r, s) for p, r, s in seen if r.stop_reason == "max_new_tokens"]
    assert cut and all(len(r.completion_ids) == 2 for _, r, _ in cut)
    for problem, rollout, score in cut:
        if score.extracted is None:
            assert score.status == "missing" and score.reward == 0.0
    missing = sum(s.status == "missing" for _, _, s in seen) / len(seen)
    assert any(s.status == "missing" for _, _, s in cut)
    assert float(trainer.callback_metrics["train/missing_answer"]) == pytest.approx(missing)
    # And the status itself: a completion cut off before any answer is "missing" with reward 0.
    assert score_completion("Let me think step by step about", "4") == Score(0.0, False, None, "missing")


def test_a_prompt_holding_the_learned_token_is_refused(tiny_loaded):
    """Tokens before the first continuation are never scored: the row must not appear there."""
    from ctt.data.problems import Problem
    from ctt.policy.policy import ForcingSettings, Policy

    policy = Policy(tiny_loaded, ForcingSettings(), "Answer.")
    with pytest.raises(DataError, match="p7: the question contains the token text '<|continue-thinking|>'"):
        policy.prompt_ids(Problem("p7", "What is <|continue-thinking|> + 1?", "1"))


def test_prompts_are_cached_by_question_not_by_id(tiny_loaded):
    """Two benchmarks may both have a problem "0": each must be asked its own question."""
    from ctt.data.problems import Problem
    from ctt.policy.policy import ForcingSettings, Policy

    policy = Policy(tiny_loaded, ForcingSettings(), "Answer.")
    a, b = policy.prompt_ids(Problem("0", "What is 1+1?", "2")), policy.prompt_ids(Problem("0", "What is 7*6?", "42"))
    assert a != b and "7*6" in tiny_loaded.tokenizer.decode(b)


def test_micro_batches_of_one_step_sample_with_their_own_seeds(smoke_cfg, monkeypatch):
    """With gradient accumulation, the micro-batches of one optimizer step used to share one sampling seed."""
    from ctt.policy.policy import Policy

    seeds, rollout = [], Policy.rollout

    def recording(self, problems, forcing, sampling, samples_per_prompt=1):
        seeds.append(sampling.seed)
        return rollout(self, problems, forcing, sampling, samples_per_prompt)

    monkeypatch.setattr(Policy, "rollout", recording)
    import lightning as L

    from ctt.training.module import build_module

    cfg = smoke_cfg()
    L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(build_module(cfg), datamodule=instantiate(cfg.data))
    assert len(seeds) == 4 and len(set(seeds)) == 4, seeds
