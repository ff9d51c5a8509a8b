import pytest
import torch
from transformers import LlamaForCausalLM

from securetune.features import layer_features, tokenize_prompts
from securetune.finetune.__main__ import robust_modules
from securetune.finetune.loss import example_losses, response_positions, summed_loss
from securetune.finetune.sft_data import (
    IGNORE,
    batch_order,
    collate,
    encode_examples,
    micro_batches,
)
from securetune.finetune.train import checkpoint_due, lr_factor
from securetune.models import load_tokenizer
from securetune.robustness import noise_perturbed
from securetune.settings import TrainConfig


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_is_a_common_factor_so_group_ratios_hold(schedule):
    factors = [lr_factor(s, 20, 0.1, schedule) for s in range(20)]
    assert factors[0] == pytest.approx(0.5)  # warm-up: 2 steps
    assert all(0.0 <= f <= 1.0 for f in factors)
    if schedule == "constant":
        assert factors[5:] == [1.0] * 15


def test_batch_order_is_seeded_and_covers_epochs():
    a = batch_order(10, 4, 5, seed=1)
    assert a == batch_order(10, 4, 5, seed=1)
    assert a != batch_order(10, 4, 5, seed=2)
    assert sorted(sum(a[:2], []) + a[2][:2]) == list(range(10))


def test_loss_mask_covers_exactly_the_response(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    [(ids, labels)] = encode_examples(tok, ["How are you?"], ["Fine, thanks."], 256)
    answer = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    assert tok.decode(answer).startswith("Fine, thanks.")
    assert labels[0] == IGNORE and len(ids) == len(labels)


def test_features_do_not_depend_on_batch_companions(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tokenize_prompts(tok, ["short", "a much longer prompt with more words in it"], 256)
    together = layer_features(model, ids, tok.pad_token_id, batch_size=2)
    alone = layer_features(model, ids[:1], tok.pad_token_id, batch_size=1)
    assert together.shape == (2, 2, 32)
    assert torch.allclose(together[:, :1], alone, atol=1e-5)


def test_too_long_prompt_is_an_error(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(ValueError, match="max_prompt_tokens = 5"):
        tokenize_prompts(tok, ["this prompt is longer than five tokens"], 5)


def test_noise_is_seeded_and_restored(tiny_model_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    weight = model.model.layers[1].mlp.up_proj.weight
    before = weight.detach().clone()
    with noise_perturbed(model, [(1, "up")], alpha=1.0, seed=7):
        first = weight.detach().clone()
    with noise_perturbed(model, [(1, "up")], alpha=1.0, seed=7):
        assert torch.equal(weight, first)
    assert torch.equal(weight, before)
    assert not torch.equal(first, before)
    assert (first - before).std() == pytest.approx(before.std().item(), rel=0.1)


def test_heldout_losses_are_the_training_loss_per_example_and_batch_free(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = encode_examples(
        tok, ["Hi", "Name three colours, please."], ["Hello there.", "Red, green, blue."], 256
    )
    together = example_losses(model, examples, tok.pad_token_id, batch_size=2)
    alone = [example_losses(model, [e], tok.pad_token_id, batch_size=1)[0] for e in examples]
    for (sum_a, n_a), (sum_b, n_b) in zip(together, alone, strict=True):
        assert n_a == n_b > 0 and sum_a == pytest.approx(sum_b, rel=1e-4)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    positions, targets = response_positions(batch["labels"])
    assert sum(t for t, _ in together) == pytest.approx(
        float(summed_loss(logits[:, positions], targets)), rel=1e-4
    )


def test_micro_batches_group_examples_of_similar_length():
    examples = [([1] * n, [IGNORE] * n) for n in (9, 2, 7, 3, 8)]
    assert micro_batches([0, 1, 2, 3, 4], 2, examples) == [[1, 3], [2, 4], [0]]
    assert micro_batches([4, 0], 0, examples) == [[4, 0]]


def _train_config(**changes) -> TrainConfig:
    settings = {
        "arm": "a", "kind": "ml_lr", "lr": 1e-3, "gamma": 0.1, "steps": 6, "batch_size": 2,
        "warmup_ratio": 0.0, "schedule": "linear", "max_seq_len": 32, "weight_decay": 0.0,
        "grad_clip": 1.0, "seed": 0,
    }  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def test_checkpoints_every_n_steps_but_not_after_the_last():
    every_two = _train_config(checkpoint_every=2)
    assert [d for d in range(1, 7) if checkpoint_due(every_two, d)] == [2, 4]
    assert not any(checkpoint_due(_train_config(), d) for d in range(1, 7))


def test_plan_is_required_by_the_kinds_that_train_by_it(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"modules": ["L1.down", "L0.q"]}')
    assert robust_modules(plan, _train_config()) == {"L0.q", "L1.down"}
    assert robust_modules(None, _train_config(kind="vanilla")) == set()
    with pytest.raises(SystemExit, match="arm 'a' of kind ml_lr needs --plan"):
        robust_modules(None, _train_config())
