"""The transformers backend, LoRA merging and retries (the vLLM backend: tests/integration)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from securetune.generation import (
    GenerationError,
    generate_completions,
    main,
    prompt_token_ids,
    servable_model,
    with_retries,
)
from securetune.models import chat_prompt, load_model, load_tokenizer
from securetune.settings import GenerationConfig

PROMPTS = ["How do I bake bread?", "Name three rivers.", "Write a haiku about rain."]


def _cfg(**kw) -> GenerationConfig:
    return GenerationConfig.from_params(
        {"backend": "transformers", "max_new_tokens": 6, "batch_size": 2, **kw}
    )


def test_prompt_tokens_are_the_chat_template(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ids = prompt_token_ids(tok, PROMPTS)
    assert tok.decode(ids[0]) == chat_prompt(tok, PROMPTS[0])
    assert ids[0][-3:] == tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]


def test_greedy_is_deterministic_and_batch_independent(tiny_model_dir):
    # Longest first: batches group prompts by length, and completions must come back in order.
    prompts = ["Tell me a long story about a dragon who bakes bread every morning.", *PROMPTS]
    a, _ = generate_completions(tiny_model_dir, prompts, _cfg(), "float32", 0)
    b, _ = generate_completions(tiny_model_dir, prompts, _cfg(batch_size=1), "float32", 1)
    assert len({c.text for c in b}) > 1
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(0 < len(c.token_ids) <= 6 for c in a)
    # The completion continues the prompt exactly as an unbatched greedy argmax would.
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    ids = torch.tensor([prompt_token_ids(tok, prompts[:1])[0]])
    first = model(ids).logits[0, -1].argmax().item()
    assert a[0].token_ids[0] == first


def test_sampling_depends_on_seed(tiny_model_dir):
    cfg = _cfg(temperature=1.5, max_new_tokens=12)
    a, _ = generate_completions(tiny_model_dir, PROMPTS, cfg, "float32", 0)
    b, _ = generate_completions(tiny_model_dir, PROMPTS, cfg, "float32", 0)
    c, _ = generate_completions(tiny_model_dir, PROMPTS, cfg, "float32", 7)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_lora_adapter_is_merged_before_serving(tiny_model_dir, tmp_path):
    base = load_model(tiny_model_dir)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(base, lora)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter change something
            torch.nn.init.normal_(p, std=0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    load_tokenizer(tiny_model_dir).save_pretrained(adapter)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = peft_model(ids).logits
    with servable_model(adapter) as served:
        assert served != adapter and (served / "config.json").exists()
        merged = load_model(served)
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert not served.exists()  # the merged copy is temporary
    with servable_model(tiny_model_dir) as served:
        assert served == tiny_model_dir


def test_retries_are_bounded():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("engine hiccup")
        return "ok"

    assert with_retries(flaky, 2, "x") == "ok"
    calls.clear()
    with pytest.raises(GenerationError, match="failed 2 time"):
        with_retries(flaky, 1, "x")
    assert len(calls) == 2


def test_cli_writes_table_and_settings(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.parquet"
    pd.DataFrame(
        {
            "prompt_id": ["a:0", "a:1", "a:2"],
            "prompt": PROMPTS,
            "benchmark": "advbench",
            "kind": "harmful",
            "reference": "",
        }
    ).to_parquet(prompts)
    out, meta = tmp_path / "g" / "advbench.parquet", tmp_path / "g" / "advbench.json"
    settings = {"backend": "transformers", "max_new_tokens": 5, "batch_size": 2}
    main(
        [
            "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
            "--out-meta", str(meta), "--arm", "base", "--settings", json.dumps(settings),
        ]
    )  # fmt: skip
    df = pd.read_parquet(out)
    assert list(df["prompt_id"]) == ["a:0", "a:1", "a:2"]
    assert (df["n_tokens"] == df["completion_token_ids"].map(len)).all()
    assert set(df["decoding"]) == {"greedy"} and set(df["backend"]) == {"transformers"}
    info = json.loads(meta.read_text())
    assert info["settings"]["max_new_tokens"] == 5 and "torch" in info["versions"]


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="generation.backend 'tgi'"):
        GenerationConfig.from_params({"backend": "tgi", "max_new_tokens": 1, "batch_size": 1})


def test_a_shared_opening_is_prefilled_once_with_the_same_completions(tiny_model_dir, monkeypatch):
    import securetune.generation as generation

    opening = "You are a careful assistant who answers briefly. "
    prompts = [opening + p for p in ["Tell me about dragons and their bread.", *PROMPTS]]
    tok = load_tokenizer(tiny_model_dir)
    assert generation.shared_opening(prompt_token_ids(tok, prompts)) >= 10
    cfg = _cfg(batch_size=4, max_new_tokens=10)
    shared, _ = generate_completions(tiny_model_dir, prompts, cfg, "float32", 0)
    monkeypatch.setattr(generation, "shared_opening", lambda ids: 0)
    whole, _ = generate_completions(tiny_model_dir, prompts, cfg, "float32", 0)
    assert [c.token_ids for c in shared] == [c.token_ids for c in whole]
    assert len({c.text for c in whole}) > 1


def test_shared_opening_leaves_each_prompt_a_token():
    from securetune.generation import shared_opening

    assert shared_opening([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_opening([[7, 8, 9], [7, 8, 9]]) == 2
    assert shared_opening([[1, 2], [3, 2]]) == 0


def _prompt_file(path, benchmark, prompts):
    pd.DataFrame(
        {
            "prompt_id": [f"{benchmark}:{i}" for i in range(len(prompts))],
            "prompt": prompts,
            "benchmark": benchmark,
            "kind": "harmful",
            "reference": "",
        }
    ).to_parquet(path)
    return path


def _cli(model, prompts, outs, settings):
    args = ["--model", str(model), "--arm", "base", "--settings", json.dumps(settings)]
    args += ["--prompts", *map(str, prompts), "--out", *map(str, outs)]
    main([*args, "--out-meta", *(str(o.with_suffix(".json")) for o in outs)])
    return [pd.read_parquet(o) for o in outs]


def test_a_jobs_benchmarks_decoded_together_give_each_benchmarks_completions(
    tiny_model_dir, tmp_path
):
    # Greedy: one call over both benchmarks' prompts, split back; the same as one job each.
    a = _prompt_file(tmp_path / "a.parquet", "advbench", PROMPTS)
    b = _prompt_file(tmp_path / "b.parquet", "harmbench", ["Hi", "Tell me about tides at dusk."])
    settings = {"backend": "transformers", "max_new_tokens": 6, "batch_size": 4}
    together = _cli(
        tiny_model_dir,
        [a, b],
        [tmp_path / "t" / "a.parquet", tmp_path / "t" / "b.parquet"],
        settings,
    )
    alone = [_cli(tiny_model_dir, [p], [tmp_path / "s" / p.name], settings)[0] for p in (a, b)]
    for joint, single in zip(together, alone, strict=True):
        pd.testing.assert_frame_equal(joint, single)
    assert list(together[1]["prompt_id"]) == ["harmbench:0", "harmbench:1"]


def _batch(tok, prompts):
    """A left-padded batch as `generate_transformers` builds it, without a shared opening."""
    ids = prompt_token_ids(tok, prompts)
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    return input_ids, mask


def test_decoding_that_drops_rows_keeps_every_rows_greedy_tokens(tiny_model_dir):
    from securetune.generation import decode_greedy

    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    prompts = ["Tell me a long story about a dragon who bakes bread.", *PROMPTS]
    input_ids, mask = _batch(tok, prompts)
    reference = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
        pad_token_id=tok.pad_token_id, eos_token_id=None,
    )[:, input_ids.shape[1]:].tolist()  # fmt: skip
    assert len({tuple(r) for r in reference}) > 1
    never = decode_greedy(model, input_ids, mask, None, 8, None, lambda row, ids: False)
    assert never == reference
    # Rows 0 and 2 settle after 2 and 5 tokens and leave the batch; the others decode on.
    lengths = {0: 2, 2: 5}
    dropped = decode_greedy(
        model, input_ids, mask, None, 8, None, lambda row, ids: len(ids) == lengths.get(row)
    )
    assert dropped == [r[: lengths.get(k, 8)] for k, r in enumerate(reference)]


def test_a_row_settles_on_a_refusal_in_its_opening_and_only_if_stoppable(tiny_model_dir):
    from securetune.generation import refusal_settled

    tok = load_tokenizer(tiny_model_dir)
    settled = refusal_settled(tok, [True, False])
    refusal = tok("I'm sorry, but I can't help with that.", add_special_tokens=False).input_ids
    answer = tok("Sure. First, mix the flour and water.", add_special_tokens=False).input_ids
    assert settled(0, refusal)
    assert not settled(1, refusal)  # a math or usability prompt decodes on
    assert not settled(0, answer)
    # A refusal phrase after the opening's two sentences is a caveat, not a refusal.
    late = tok("Sure. Mix the flour. Then bake it; I can't say how long.", add_special_tokens=False)
    assert not settled(0, late.input_ids)


def test_stop_at_refusal_cuts_only_refusal_scored_kinds(tiny_model_dir, tmp_path, monkeypatch):
    import securetune.generation as generation

    harmful = _prompt_file(tmp_path / "advbench.parquet", "advbench", PROMPTS)
    math = tmp_path / "gsm8k.parquet"
    pd.read_parquet(harmful).assign(benchmark="gsm8k", kind="math").to_parquet(math)
    settings = {"backend": "transformers", "max_new_tokens": 6, "batch_size": 4}
    full = _cli(tiny_model_dir, [harmful, math], [tmp_path / "f" / p.name for p in (harmful, math)],
                settings)  # fmt: skip
    # The random tiny model never refuses: make every non-empty text read as a refusal.
    monkeypatch.setattr(generation, "is_refusal", lambda text: bool(text.strip()))
    cut = _cli(tiny_model_dir, [harmful, math], [tmp_path / "c" / p.name for p in (harmful, math)],
               {**settings, "stop_at_refusal": True})  # fmt: skip
    assert (cut[0]["n_tokens"] < full[0]["n_tokens"]).all()
    pairs = zip(cut[0]["completion_token_ids"], full[0]["completion_token_ids"], strict=True)
    for short, whole in pairs:
        assert list(short) == list(whole)[: len(short)]
    pd.testing.assert_series_equal(cut[1]["completion"], full[1]["completion"])


@pytest.mark.parametrize(
    "settings", [{"backend": "vllm"}, {"backend": "transformers", "temperature": 0.7}]
)
def test_stop_at_refusal_needs_greedy_transformers(settings):
    with pytest.raises(ValueError, match="generation.stop_at_refusal"):
        GenerationConfig.from_params(
            {"max_new_tokens": 4, "batch_size": 2, "stop_at_refusal": True, **settings}
        )
