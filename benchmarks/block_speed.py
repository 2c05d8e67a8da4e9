"""How long does AffineQuant take to calibrate one decoder block of a given width? (issues 14, 17)

One randomly initialised Llama block (hidden ``--hidden``, intermediate 11008/4096 of it, heads of
128, the 7B shape at 4096), AffineQuant w4a16g128 in its default form (diagonal norm side,
per-KV-head out transform, q·k transform), trained on one 256-token window for two epochs: the
7B row's budget in ``build_memory.py``. Prints the block's calibration seconds (the plan's
``seconds``: statistics, structure discovery, training, freeze and the quantized block's
forward), its epoch losses and a hash of every plan tensor, so that two commits can be compared
for speed and for what they computed. It writes no section: it times code, not artifacts, and
its figures belong in the note of the change they measure. Run each commit alone on the machine:

    python benchmarks/block_speed.py --hidden 4096
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aqexport.calibrate.engine import calibrate
from aqexport.calibrate.plan import QuantPlan
from aqexport.recipes import make_recipe

HEAD_DIM = 128


def plan_digest(block_plan) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(block_plan.tensors().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    heads = args.hidden // HEAD_DIM
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11008 // 4096,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=1,
        vocab_size=512,
    )
    model = LlamaForCausalLM(config).eval()
    windows = torch.randint(0, config.vocab_size, (1, args.tokens))
    recipe = make_recipe("affinequant", "w4a16g128", epochs=args.epochs)
    plan = QuantPlan(recipe.as_dict(), {})
    start = time.perf_counter()
    calibrate(model, windows, recipe, plan, HEAD_DIM, heads)
    total = time.perf_counter() - start
    block = plan.blocks[0]
    print(
        f"hidden {args.hidden}: block {block.seconds:.1f} s (calibrate {total:.1f} s), "
        f"losses {block.loss_curve}, output mse {block.output_mse:.6e}, plan sha256 {plan_digest(block)}"
    )


if __name__ == "__main__":
    main()
