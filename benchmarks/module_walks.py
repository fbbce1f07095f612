"""Host time of the per-step walks over a Qwen2.5-7B-structured LoRA model (28 layers, rank-8 adapters on every
linear; tiny widths: the walks' cost is the module tree, not the tensors): transformers' `model.train()`,
`model.zero_grad()` and clipping over `model.parameters()`, against vftrain/walks.py's lists (which must outlive a
forward). Runs on any machine: `python benchmarks/module_walks.py`; prints one JSON line (milliseconds per call)."""

from __future__ import annotations

import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from vftrain.walks import walk


def ms(fn, n: int = 30) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - start) / n * 1e3, 3)


def main() -> None:
    config = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    model = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=8, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    out = dict(modules=sum(1 for _ in model.modules()), parameters=sum(1 for _ in model.parameters()),
               trainable=len(trainable))

    def with_grads(fn):
        def run():
            for p in trainable:
                p.grad = torch.ones_like(p)
            fn()
        return run

    baseline = ms(with_grads(lambda: None))  # setting the gradients, taken off the zero_grad/clip figures
    for name, train, zero_grad, parameters in (
            ("full walks", model.train, model.zero_grad, model.parameters),
            ("listed once", walk(model).train, walk(model).zero_grad, walk(model).parameters)):
        out[name] = dict(train=ms(train), zero_grad=round(ms(with_grads(zero_grad)) - baseline, 3),
                         clip=round(ms(with_grads(lambda: torch.nn.utils.clip_grad_norm_(parameters(), 1.0)))
                                    - baseline, 3))
    ids = torch.arange(64).reshape(1, 64) % config.vocab_size
    listed = walk(model).modules
    model(input_ids=ids).logits.sum().backward()  # transformers' forward registers its layers into a new ModuleList
    walk(model).train()
    out["lists outlive a forward"] = walk(model).modules is listed
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
