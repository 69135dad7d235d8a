"""The token: only its row is trainable, frozen weights stay bit-identical, init strategies, the token file."""

from __future__ import annotations

import pytest
import torch

from ctt.errors import ModelError, TokenFileError
from ctt.engine import ForcingConfig, SamplingConfig
from ctt.engine.hf import generate_forced
from ctt.rl.reinforce import completion_logprobs, compute_advantages, reinforce_loss
from ctt.models.token import CONTINUE_THINKING, get_overlay, install_token, load_token_file, save_token_file
from ctt.models.loading import load_model
from tests.conftest import tiny


def _rl_steps(loaded, steps: int, lr: float = 0.05):
    model, tok = loaded.model, loaded.tokenizer
    overlay = get_overlay(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    cfg = ForcingConfig(
        end_of_thinking_ids=tuple(loaded.end_of_thinking_ids), eos_token_ids=(tok.eos_token_id,),
        num_continuations=2, continuation_ids=overlay.token_ids, max_new_tokens=24, banned_ids=overlay.token_ids,
    )
    prompts = [tok.encode(p) for p in ["one", "two", "three", "four", "five", "six", "seven", "eight"]]
    for step in range(steps):
        rollouts = generate_forced(model, prompts, cfg, SamplingConfig(1.0, seed=step))
        rewards = torch.tensor([float(len(r.completion_ids)) for r in rollouts])
        scored = completion_logprobs(model, rollouts, banned_ids=overlay.token_ids)
        loss = reinforce_loss(scored, compute_advantages(rewards, 2, "batch_mean"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("tie", [True, False])
def test_only_the_row_changes_and_frozen_weights_stay_bit_identical(tie):
    loaded = tiny(boost=4.0, tie=tie)
    model = loaded.model
    row = get_overlay(model).row
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p is not row}
    row_before = row.detach().clone()
    optimizer = _rl_steps(loaded, steps=3)
    assert not torch.equal(row, row_before), "the token row did not move"
    for name, p in model.named_parameters():
        if p is not row:
            assert torch.equal(p, before[name]), f"frozen weight {name} changed"
    # The optimizer holds exactly one tensor, of shape [hidden], and state only for it.
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == 1 and params[0] is row and row.shape == (model.config.hidden_size,)
    assert list(optimizer.state) == [row]
    assert model.config.tie_word_embeddings == tie


def test_k_learned_tokens_train_only_their_k_rows():
    """token.count=3: three consecutive new ids, one [3, hidden] parameter, every row moved by training and every
    frozen weight bit-identical; each id reads its own row in the forward."""
    loaded = tiny(boost=4.0, count=3)
    model, tok = loaded.model, loaded.tokenizer
    overlay = get_overlay(model)
    assert overlay.token_ids == tuple(range(overlay.token_id, overlay.token_id + 3))
    assert tok.convert_ids_to_tokens(list(overlay.token_ids)) == [f"<|continue-thinking-{i}|>" for i in (1, 2, 3)]
    row = overlay.row
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p is not row}
    row_before = row.detach().clone()
    optimizer = _rl_steps(loaded, steps=3)
    assert [p for g in optimizer.param_groups for p in g["params"]] == [row] and row.shape == (3, 64)
    assert all(not torch.equal(row[i], row_before[i]) for i in range(3)), "every one of the k rows must move"
    for name, p in model.named_parameters():
        if p is not row:
            assert torch.equal(p, before[name]), f"frozen weight {name} changed"
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor([[5, *overlay.token_ids, 7]]))
    assert torch.equal(embeds[0, 1:4], row.detach()) and torch.equal(embeds[0, 0], overlay.base.weight[5])


def test_k_row_token_file_round_trip_and_count_mismatch(tmp_path):
    row = get_overlay(tiny(count=2).model).row.detach()
    path = save_token_file(tmp_path / "k.safetensors", row, {"token": CONTINUE_THINKING, "base_model": "tiny"})
    embedding, meta = load_token_file(path, hidden_size=64, base_model="tiny", count=2)
    assert torch.equal(embedding, row) and meta["count"] == "2" and meta["hidden_size"] == "64"
    with pytest.raises(TokenFileError, match="holds 2 learned token"):
        load_token_file(path, count=1)
    save_token_file(tmp_path / "one.safetensors", row[0], {"token": CONTINUE_THINKING, "base_model": "tiny"})
    with pytest.raises(TokenFileError, match="holds 1 learned token"):
        load_token_file(tmp_path / "one.safetensors", count=2)


@pytest.mark.parametrize("spare_rows", [0, 8])
def test_gradient_reaches_only_the_row(spare_rows):
    """Without spare rows the new id lies past the table; with them (Qwen2 checkpoints have ~270) it has a row of
    the table, which the overlay must never read. Untied with spare rows: tied, the lm_head's row at that id gets
    the logits' gradient, which is not the input table's."""
    loaded = tiny(boost=4.0, tie=not spare_rows, spare_rows=spare_rows)
    model, tok = loaded.model, loaded.tokenizer
    overlay = get_overlay(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.embed_tokens.row"]
    # Make every weight require grad to see where gradient would flow from the loss.
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.tensor([tok.encode("ab") + [overlay.token_id] + tok.encode("cd")])
    logits = model(ids).logits
    logits[0, -1].logsumexp(-1).backward()
    table_grad = overlay.base.weight.grad
    assert overlay.row.grad is not None and overlay.row.grad.abs().sum() > 0
    if spare_rows:
        assert overlay.token_id < table_grad.shape[0] == len(tok) - 1 + spare_rows
        # The table's row at the new id gets no gradient: the overlay never reads the base table for the new token,
        # while the rows of the other input tokens do get one.
        assert table_grad[overlay.token_id].abs().sum() == 0
        assert all(table_grad[t].abs().sum() > 0 for t in tok.encode("abcd"))
    else:
        assert overlay.token_id == table_grad.shape[0]  # the first id past the table: nothing there to read


def test_row_is_used_in_the_forward():
    loaded = tiny()
    model, tok = loaded.model, loaded.tokenizer
    overlay = get_overlay(model)
    ids = torch.tensor([tok.encode("ab") + [overlay.token_id]])
    with torch.no_grad():
        a = model(ids).logits
        overlay.row.add_(1.0)
        b = model(ids).logits
    assert not torch.allclose(a[0, -1], b[0, -1])
    assert torch.allclose(a[0, :-1], b[0, :-1]), "only positions at and after the token may change"


@pytest.mark.parametrize(
    "init,expected",
    [
        ({"name": "word", "word": "W"}, lambda table, tok: table[tok.encode("W")[0]]),
        ({"name": "mean"}, lambda table, tok: table[: len(tok) - 1].mean(0)),
    ],
)
def test_init_strategies(init, expected):
    loaded = load_model(name="t", source="tiny_random", end_of_thinking="</think>")
    table = loaded.model.get_input_embeddings().weight.detach().clone()
    overlay = install_token(loaded.model, loaded.tokenizer, init)
    assert torch.allclose(overlay.row, expected(table, loaded.tokenizer))


def test_random_init_has_embedding_scale_and_depends_on_seed():
    rows = []
    for seed in (0, 0, 1):
        loaded = load_model(name="t", source="tiny_random", end_of_thinking="</think>")
        table = loaded.model.get_input_embeddings().weight.detach()
        rows.append(install_token(loaded.model, loaded.tokenizer, {"name": "random", "seed": seed}).row.detach())
    assert torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[2])
    assert rows[0].norm() == pytest.approx(float(table.norm(dim=1).mean()), rel=1e-4)


def test_token_already_in_vocabulary_is_refused():
    loaded = load_model(name="t", source="tiny_random", end_of_thinking="</think>")
    with pytest.raises(ModelError, match="already in the vocabulary"):
        install_token(loaded.model, loaded.tokenizer, {"name": "mean"}, token="</think>")


def test_token_file_round_trip_and_mismatch_errors(tmp_path):
    loaded = tiny()
    row = get_overlay(loaded.model).row
    path = save_token_file(tmp_path / "t.safetensors", row, {"token": CONTINUE_THINKING, "base_model": "tiny", "step": 3})
    assert not list(tmp_path.glob("*.tmp")), "temp file left behind"
    embedding, meta = load_token_file(path, hidden_size=row.shape[0], base_model="tiny")
    assert torch.equal(embedding, row.detach()) and meta["step"] == "3" and meta["token"] == CONTINUE_THINKING
    with pytest.raises(TokenFileError, match="hidden size"):
        load_token_file(path, hidden_size=row.shape[0] + 1)
    with pytest.raises(TokenFileError, match="base model"):
        load_token_file(path, base_model="other")
    with pytest.raises(TokenFileError, match="not found"):
        load_token_file(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TokenFileError, match="not a readable"):
        load_token_file(tmp_path / "bad.safetensors")


def test_a_lossy_tokenizer_does_not_make_a_new_token_look_known():
    """A WordLevel tokenizer that drops unknown characters encodes `<|continue-thinking|>` as its one known
    character, "-": one id, but not the token's text (issue 20, family 7: decided by a round trip)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ctt.models.token import CONTINUE_THINKING, check_token_text

    raw = Tokenizer(models.WordLevel({"-": 0, "<unk>": 1}, unk_token="<unk>"))
    raw.normalizer = normalizers.Replace(Regex("[^-]"), "")
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    assert tok.encode(CONTINUE_THINKING, add_special_tokens=False) == [0]
    check_token_text(tok, CONTINUE_THINKING)  # new to this vocabulary: accepted
    with pytest.raises(ModelError, match=r"'-' is already in the vocabulary"):
        check_token_text(tok, "-")
