"""Sample monitoring: once per optimizer step that triggers it (gradient accumulation > 1), main process only;
the embedded backend and an OpenAI-compatible localhost server (weights and LoRA adapters pushed first); a
server that is down is skipped, never fatal."""

from __future__ import annotations

import json
import logging
import os

import datasets

import vftrain as vf
from conftest import TINY, addition_rows, small_config, tiny_tokenizer
import vftrain.sampling.embedded  # noqa: F401  (vf.sampling.embedded below)
from vftrain.sampling.callback import SampleCallback


def _trainer(tmp_path, **overrides):
    cfg = small_config(tmp_path, batch_size=8, micro_batch_size=2, sample_every_n_steps=2, num_samples=3,
                       max_new_tokens=4, **overrides)
    return vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=cfg)


def _sampler(trainer) -> SampleCallback:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SampleCallback))


def test_samples_once_per_trigger_step_with_gradient_accumulation(tmp_path):
    trainer = _trainer(tmp_path, max_steps=5)
    assert trainer.args.gradient_accumulation_steps == 4
    sampler = _sampler(trainer)
    calls = []
    real = sampler.backend
    sampler.backend = lambda prompts, step: calls.append(step) or real(prompts, step)
    trainer.train()
    assert calls == [2, 4]
    assert len(sampler.history) == 6 and {h["step"] for h in sampler.history} == {2, 4}
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r for r in logged if "eval/reward" in r]
    assert [r["step"] for r in rewards] == [2, 4] and 0.0 <= rewards[0]["eval/reward/exact_match"] <= 1.0
    # Sampling does not swallow the loss log of its step, and the run ends with its curves.
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5]
    assert (tmp_path / "out" / "training_curves.png").stat().st_size > 1000


def test_samples_come_from_held_out_rows(tmp_path):
    trainer = _trainer(tmp_path)
    held_out = [p.messages[-1]["content"] for p, _ in _sampler(trainer).pairs]
    assert held_out == [r["prompt"][0]["content"] for r in addition_rows(40)[-3:]]
    assert len(trainer.train_rows) == 37  # the sampled rows are not trained on


def test_openai_backend_pushes_full_weights(tmp_path):
    from vftrain.serve import serve

    server = serve(TINY, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        trainer = _trainer(tmp_path, sample_backend="openai", sample_base_url=url, max_steps=2,
                           learning_rate=5e-2)
        sampler = _sampler(trainer)
        trainer.train()
        served = sampler.backend([p for p, _ in sampler.pairs], 2)
        local = vf.sampling.embedded.generate(trainer.model, trainer.processing_class,
                                              [p for p, _ in sampler.pairs], 4)
        assert served == local  # the server generates with the trained weights, not the base model's
        assert len(sampler.history) == 3
    finally:
        server.shutdown()


def test_openai_backend_pushes_lora_adapter(tmp_path):
    from vftrain.serve import serve

    server = serve(TINY, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        trainer = _trainer(tmp_path, sample_backend="openai", sample_base_url=url, max_steps=4, use_lora=True,
                           learning_rate=5e-2)
        sampler = _sampler(trainer)
        trainer.train()
        name, path = sampler.backend.current_adapter
        assert name.endswith("-step-4") and path.endswith("-step-4") and os.path.isdir(path)
        assert not list((tmp_path / "out" / "sampling").glob("*-step-2"))  # the previous round's adapter is gone
        import openai

        models = [m.id for m in openai.OpenAI(base_url=url, api_key="x").models.list().data]
        assert name in models and not any(m.endswith("-step-2") for m in models)
        served = sampler.backend([p for p, _ in sampler.pairs], 4)
        local = vf.sampling.embedded.generate(trainer.model, trainer.processing_class,
                                              [p for p, _ in sampler.pairs], 4)
        assert served == local
    finally:
        server.shutdown()


def test_server_down_is_logged_and_skipped(tmp_path, caplog):
    trainer = _trainer(tmp_path, sample_backend="openai", sample_base_url="http://127.0.0.1:9/v1",
                       sample_timeout=5.0, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="vftrain"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert any("sampling at step 2 skipped" in r.getMessage() for r in caplog.records)


def test_greedy_generation_ignores_the_checkpoints_sampling_defaults():
    """A checkpoint's generation_config (Qwen ships repetition_penalty 1.05 and top_k 20; here harsher, plus a
    minimum length and beams) does not reach held-out or sample generations: greedy completions are the argmax of
    each step's logits, and the model keeps its config (saved checkpoints carry it on)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vftrain.data.render import stop_token_ids
    from vftrain.sampling.embedded import encode_prompt, generate_ids

    model, tokenizer = AutoModelForCausalLM.from_pretrained(TINY), tiny_tokenizer()
    hostile = dict(repetition_penalty=5.0, top_k=3, min_new_tokens=6, no_repeat_ngram_size=2, num_beams=2)
    model.generation_config.update(**hostile)
    stops = stop_token_ids(tokenizer)
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in addition_rows(6)]
    got = generate_ids(model, prompts, 8, stops, tokenizer.pad_token_id)
    for prompt, sample in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] in stops:
                    break
        assert sample.completion_ids == ids[len(prompt):]
    assert {k: getattr(model.generation_config, k) for k in hostile} == hostile
