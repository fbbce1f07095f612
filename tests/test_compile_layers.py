"""compile_layers: the decoder layers compiled (torch.compile, dynamic shapes) for training and evaluation forwards
only, in place of liger's kernels, on by default for models of >= 100M parameters on one CUDA GPU.

On the CPU the scoping and the fallback run with dynamo's counting backend (no code generation: the compiled
layers compute exactly what the eager ones do); the decision runs on a simulated GPU; the last tests train on a
CUDA GPU (tests/gpu.sh) against the eager layers."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import vftrain as vf
import vftrain.compile as compile_module
from conftest import TINY, addition_rows, small_config, tiny_tokenizer
from vftrain.compile import CompiledLayers, decoder_layers
from vftrain.errors import ConfigError
from vftrain.models import layers_compiled

IDS = torch.tensor([[3, 4, 5, 6, 7, 8]])


def _tiny_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY).eval()


def test_layers_run_compiled_inside_active_only():
    """Forwards inside `active()` go through torch.compile; before and after it, and generation after it, the
    layers are eager again (a decoder's KV cache and CUDA graphs never meet the compiled layers)."""
    torch._dynamo.reset()
    model = _tiny_model()
    eager = model(input_ids=IDS).logits
    counter = CompileCounter()
    layers = CompiledLayers(model, backend=counter)
    assert torch.equal(model(input_ids=IDS).logits, eager) and counter.frame_count == 0
    with layers.active():
        inside = model(input_ids=IDS).logits
        model(input_ids=IDS[:, :4])  # a new length: the same dynamic graph
    assert counter.frame_count >= 1
    torch.testing.assert_close(inside, eager)
    frames = counter.frame_count
    model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert counter.frame_count == frames
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    assert len(decoder_layers(model)) == model.config.num_hidden_layers


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no code generator here")


def _backward_fails(gm, example_inputs):
    """Traces and runs the forward as is; generating the backward's code fails."""
    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(fw_compiler=lambda fw, _: fw, bw_compiler=_broken_backend)(gm, example_inputs)


@pytest.mark.parametrize("backend", [_broken_backend, _backward_fails], ids=["forward", "backward"])
def test_a_layer_that_does_not_compile_runs_eagerly_unless_asked_for(caplog, backend):
    """Left unset, a compile failure warns once and the layers run eagerly (same logits and gradients), also where
    only the backward fails to compile (torch would otherwise raise that at the first backward, past the
    fallback); an explicit compile_layers = true (strict) raises it at the forward."""
    torch._dynamo.reset()
    model = _tiny_model()
    eager = model(input_ids=IDS).logits
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    layers = CompiledLayers(model, backend=backend)
    with caplog.at_level(logging.WARNING, logger="vftrain"), layers.active():
        out = model(input_ids=IDS).logits
        out.sum().backward()
        model(input_ids=IDS)
    assert caplog.text.count("compile_layers: torch.compile failed") == 1
    torch.testing.assert_close(out, eager)
    for p, grad in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, grad)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed), CompiledLayers(
            model, strict=True, backend=backend).active():
        model(input_ids=IDS)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_and_evaluation_forwards_run_the_compiled_layers(tmp_path, checkpointing):
    """The trainer's forwards, their backward (with checkpointing: the recomputed layers) and the evaluation loss
    run inside the compiled scope: the counting backend sees frames, and the losses, eval loss and weights equal
    those of eager layers."""
    rows = datasets.Dataset.from_list(addition_rows(24))
    extra = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"every_n_layers": 2}) if checkpointing \
        else {}

    def run(compiled: bool, folder: str):
        config = small_config(tmp_path / folder, max_steps=3, eval_strategy="steps", eval_steps=3, learning_rate=1e-2,
                              **extra)
        trainer = vf.SFTTrainer(model=TINY, train_dataset=rows, eval_dataset=rows.select(range(8)), args=config)
        counter = CompileCounter()
        if compiled:
            trainer.compiled_layers = CompiledLayers(trainer.model, backend=counter)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
        return losses, evals, trainer.model.state_dict(), counter.frame_count

    torch._dynamo.reset()
    eager_losses, eager_evals, eager_state, _ = run(False, "eager")
    losses, evals, state, frames = run(True, "compiled")
    assert frames >= 1
    assert losses == pytest.approx(eager_losses, rel=1e-5) and evals == pytest.approx(eager_evals, rel=1e-5)
    for name, tensor in eager_state.items():
        torch.testing.assert_close(state[name], tensor)


def test_unset_stays_off_on_the_cpu_and_is_saved_resolved(tmp_path):
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)),
                            args=small_config(tmp_path, max_steps=1))
    assert trainer.args.compile_layers is False and trainer.compiled_layers is None


@pytest.mark.parametrize("clash, match", [
    (dict(use_liger=True), "use_liger = true"), (dict(use_cpu=True), "use_cpu = true"),
    (dict(torch_compile=True), "torch_compile = true")])
def test_compile_layers_true_with_a_setting_it_cannot_run_beside_is_refused(tmp_path, clash, match):
    with pytest.raises(ConfigError, match=f"compile_layers = true cannot run with {match}"):
        vf.SFTConfig(output_dir=str(tmp_path), compile_layers=True, **clash)


def test_compile_layers_true_where_the_model_cannot_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    with pytest.raises(ConfigError, match="compile_layers = true compiles for a CUDA GPU, but the model runs on the "
                                          "CPU"):
        layers_compiled(_tiny_model(), None, True)
    with pytest.raises(ConfigError, match="with liger-kernel's kernels"):
        layers_compiled(_tiny_model(), "cuda", True, use_liger=True)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2,
                                                                 vocab_size=128))
    if not decoder_layers(gpt2):  # transformers versions whose GPT-2 blocks are plain modules
        with pytest.raises(ConfigError, match="no transformers decoder layers"):
            layers_compiled(gpt2, "cuda", True)


def test_unset_compiles_models_from_100m_parameters_on_a_gpu_without_liger(monkeypatch, caplog):
    """The default on a (simulated) GPU with Triton: off below COMPILE_FROM_PARAMETERS, where liger's kernels are
    applied as before; on from it, and then liger is left off (its kernels do not compile)."""
    pytest.importorskip("liger_kernel")
    from test_gpu_defaults import _is_liger, gpu_machine

    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    with gpu_machine(), caplog.at_level(logging.INFO, logger="vftrain"):
        small, _ = vf.get_model_and_tokenizer(_tiny_model(), tokenizer=tiny_tokenizer(), device="cuda",
                                              compile_layers=None)
        assert any(_is_liger(m) for m in small.modules()) and "compiled layers: off" in caplog.text
        assert not layers_compiled(small, "cuda", None)
        monkeypatch.setattr(compile_module, "COMPILE_FROM_PARAMETERS", 0)
        large, _ = vf.get_model_and_tokenizer(_tiny_model(), tokenizer=tiny_tokenizer(), device="cuda",
                                              compile_layers=None)
        assert not any(_is_liger(m) for m in large.modules()) and "compiled layers: on" in caplog.text
        assert layers_compiled(large, "cuda", None)
        assert not layers_compiled(large, "cuda", None, use_liger=True)


@pytest.mark.parametrize("fields, may_compile", [
    (dict(use_lora=True), True), (dict(lean_mlp=False), True), ({}, True), (dict(lean_mlp=True), True),
    (dict(use_lora=True, torch_compile=True), False), (dict(torch_compile=True), False)])
def test_which_runs_compile_their_layers_when_unset(tmp_path, fields, may_compile):
    """SFT runs, LoRA or full weights (lean_mlp or not: compiled with lean_mlp, once the optimizer's tables stopped
    being rebuilt, measured +11-24%); not beside torch_compile. RL never turns it on by itself."""
    from vftrain.config_checks import compiles_when_unset

    assert compiles_when_unset(vf.SFTConfig(output_dir=str(tmp_path), **fields)) is may_compile
    assert vf.SFTTrainer.layers_compiled_by_default and not vf.RLTrainer.layers_compiled_by_default


# ---- on a CUDA GPU (tests/gpu.sh)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("lora", [False, True])
def test_compiled_layers_train_as_the_eager_ones_on_the_gpu(tmp_path, lora):
    """bf16, varlen, packed rows of changing lengths, every 2nd layer checkpointed, an eval loss: compiled layers
    against eager ones without liger, within bf16's rounding; a few graphs in all, not one per length."""
    rows = datasets.Dataset.from_list(addition_rows(96))
    counts = []

    def run(compiled: bool, folder: str):
        config = small_config(tmp_path / folder, use_cpu=False, max_steps=6, batch_size=16, micro_batch_size=4,
                              use_liger=False, compile_layers=compiled, use_lora=lora, learning_rate=1e-3,
                              gradient_checkpointing=True, gradient_checkpointing_kwargs={"every_n_layers": 2},
                              eval_strategy="steps", eval_steps=6)
        trainer = vf.SFTTrainer(model=TINY, train_dataset=rows, eval_dataset=rows.select(range(16)), args=config)
        assert trainer.args.compile_layers is compiled and (trainer.compiled_layers is not None) is compiled
        trainer.train()
        assert not (trainer.compiled_layers and trainer.compiled_layers.failed)
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        history = trainer.state.log_history
        return [h["loss"] for h in history if "loss" in h], [h["eval_loss"] for h in history if "eval_loss" in h]

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_losses, eager_evals = run(False, "eager")
    losses, evals = run(True, "compiled")
    # graphs made by the compiled run (the eager run compiled the loss's chunk function, which both share)
    assert 1 <= counts[1] - counts[0] <= 8
    assert losses == pytest.approx(eager_losses, rel=2e-2) and evals == pytest.approx(eager_evals, rel=2e-2)
    if not lora:  # rank-8 adapters at lr 1e-3 barely move a 6-step loss (GPU run, session 36: 4.5144 -> 4.5161)
        assert losses[-1] < losses[0]


@cuda
def test_rl_with_a_kl_reference_runs_compiled_layers_on_the_gpu(tmp_path):
    """RL, full weights, beta > 0: the policy's and the frozen reference copy's layers compile; sampling (eager,
    its own decoder) runs between training steps."""
    from rl_worker import config, digits

    args = config(str(tmp_path / "out"), 2, save_strategy="no", use_cpu=False, beta=0.05, compile_layers=True,
                  use_liger=False)
    trainer = vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=args,
                           reward_funcs=[digits])
    assert len(trainer.compiled_layers.layers) == 2 * trainer.model.config.num_hidden_layers
    trainer.train()
    assert not trainer.compiled_layers.failed and trainer.state.global_step == 2
