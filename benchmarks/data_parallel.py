"""What data-parallel calibration (``aqexport.calibrate.data_parallel``) can gain: per decoder
block shape, the compute of one training window against the ``all_reduce`` of one step's
gradient, and the share of a block's calibration that every rank repeats.

For each block shape a one-block Llama with random weights is calibrated by the engine itself
(``calibrate``, affinequant w4a16g128, dense transforms): once with no training (what every rank
repeats: block inputs, fp targets, statistics, freezing, propagation) and once with ``--epochs``
epochs; their difference over epochs × samples is the training time of one window (forward and
backward of the fake-quant block, its transforms' inverses included). The gradient buffer one
step all-reduces is the block's trained parameters in float64 plus one count per parameter
(``StepGradients``); its ``all_reduce`` is timed between two gloo processes on this machine.

With ``windows_per_step = N`` (one window per rank per step) N ranks take a block's training
from ``E·S·t_w`` to ``E·(S/N)·(t_w + t_ar(N))``; a ring all-reduce moves ``2(N−1)/N`` times the
buffer, so ``t_ar(N) ≈ 2(N−1)/N · t_ar(2)`` over the same link. The whole block's speed-up adds
the repeated part ``t_rep`` (Amdahl): ``(t_rep + E·S·t_w) / (t_rep + E·(S/N)·(t_w + t_ar(N)))``.

    python benchmarks/data_parallel.py [--shapes smollm2,llama-1b,llama-7b] [--samples 4] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _report import commit_id, write_section  # noqa: E402
from skeleton import machine  # noqa: E402

#: name -> (hidden, intermediate, heads, kv heads): SmolLM2-135M, Llama 3.2 1B, Llama 2 7B
SHAPES = {
    "smollm2": (576, 1536, 9, 3),
    "llama-1b": (2048, 8192, 32, 8),
    "llama-7b": (4096, 11008, 32, 32),
}
VOCAB = 2048
RESULTS = ROOT / "benchmarks" / "results" / "data_parallel.json"


def one_block_model(shape: tuple[int, int, int, int]):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, heads, kv_heads = shape
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=1,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), hidden // heads, kv_heads


def calibration_seconds(shape, epochs: int, windows: torch.Tensor) -> float:
    from aqexport.calibrate.engine import calibrate
    from aqexport.calibrate.plan import QuantPlan
    from aqexport.recipes import make_recipe

    model, head_dim, kv_heads = one_block_model(shape)
    recipe = make_recipe("affinequant", "w4a16g128", epochs=epochs, transform="dense")
    start = time.perf_counter()
    calibrate(model, windows, recipe, QuantPlan(recipe.as_dict(), {}), head_dim, kv_heads)
    return time.perf_counter() - start


def trained_parameters(shape, windows: torch.Tensor) -> int:
    """How many numbers one step's gradient holds: the block's ``BlockParameters``."""
    from aqexport.calibrate.block_inputs import catch_block_inputs
    from aqexport.calibrate.engine import BlockParameters
    from aqexport.calibrate.structure import decoder_blocks, discover_block
    from aqexport.recipes import make_recipe

    model, head_dim, kv_heads = one_block_model(shape)
    _, blocks = decoder_blocks(model)
    inputs = catch_block_inputs(model, blocks, windows[:1])
    structure = discover_block(blocks[0], inputs.hidden, inputs.kwargs[0], head_dim, kv_heads)
    recipe = make_recipe("affinequant", "w4a16g128", epochs=2, transform="dense")
    params = BlockParameters(blocks[0], structure, recipe, {})
    return sum(p.numel() for p in params.transform_parameters() + params.lwc_parameters())


def _all_reduce_worker(rank: int, port: int, numel: int, repeats: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    buffer = torch.ones(numel, dtype=torch.float64)
    dist.all_reduce(buffer)  # warm-up: connections
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        seconds.append(time.perf_counter() - start)
    if rank == 0:
        out.put(statistics.median(seconds))
    dist.destroy_process_group()


def all_reduce_seconds(numel: int, repeats: int = 5) -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    mp.start_processes(_all_reduce_worker, (port, numel, repeats, out), nprocs=2, start_method="spawn")
    return out.get()


def speed_up(row: dict, ranks: int) -> float:
    t_ar = 2 * (ranks - 1) / ranks * row["all_reduce_s"]
    steps = row["epochs"] * row["samples"]
    single = row["repeated_s"] + steps * row["train_window_s"]
    return single / (row["repeated_s"] + steps / ranks * (row["train_window_s"] + t_ar))


def measure(name: str, args) -> dict:
    shape = SHAPES[name]
    generator = torch.Generator().manual_seed(1)
    windows = torch.randint(0, VOCAB, (args.samples, args.seqlen), generator=generator)
    repeated = calibration_seconds(shape, 0, windows)
    trained = calibration_seconds(shape, args.epochs, windows)
    numel = trained_parameters(shape, windows)
    row = {
        "shape": dict(zip(("hidden", "intermediate", "heads", "kv_heads"), shape, strict=True)),
        "samples": args.samples,
        "seqlen": args.seqlen,
        "epochs": args.epochs,
        "repeated_s": repeated,
        "train_window_s": (trained - repeated) / (args.epochs * args.samples),
        "gradient_numbers": numel,
        "gradient_mib": numel * 8 / 2**20,
        "all_reduce_s": all_reduce_seconds(numel),
    }
    row["speed_up"] = {str(n): speed_up(row, n) for n in (2, 4, 8)}
    print(json.dumps({name: row}, indent=1), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    rows = {name: measure(name, args) for name in args.shapes.split(",")}
    RESULTS.write_text(json.dumps({"commit": commit_id(), "machine": machine(), "rows": rows}, indent=1) + "\n")
    lines = [
        f"| {name} ({r['shape']['hidden']}/{r['shape']['intermediate']}) | {r['train_window_s']:.2f} s | "
        f"{r['repeated_s'] / (r['epochs'] * r['samples'] * r['train_window_s'] + r['repeated_s']):.0%} | "
        f"{r['gradient_mib']:.0f} MiB | {r['all_reduce_s'] * 1e3:.0f} ms | "
        f"{r['train_window_s'] / r['all_reduce_s']:.0f} | "
        + " / ".join(f"{r['speed_up'][n]:.2f}×" for n in ("2", "4", "8"))
        + " |"
        for name, r in rows.items()
    ]
    body = f"""
## Data-parallel calibration: compute against communication per block

`python benchmarks/data_parallel.py --samples {args.samples} --seqlen {args.seqlen} --epochs {args.epochs}` at commit
{commit_id()}, {date.today()}. Machine: {machine()}. One random-weight Llama block per shape,
calibrated by the engine (affinequant w4a16g128, dense transforms, 2 threads): *train / window*
is one window's forward and backward through the fake-quant block (its transforms' inverses
included); *repeated* is the share of the block's calibration at {args.samples} samples × {args.epochs}
epochs that every rank runs whole (block inputs, fp targets, statistics, freezing,
propagation); the *gradient* is what one step all-reduces (float64), timed between two gloo
processes on this machine (1 thread each, loopback). *Speed-up* is the model in the script's
docstring for 2 / 4 / 8 ranks with `windows_per_step` = ranks, this machine's compute and
link per rank: a projection, not a run on N machines (this one has 2 cores; see the note in
`aqexport/calibrate/data_parallel.py`).

| block (hidden/intermediate) | train / window | repeated | gradient | all-reduce (2 ranks) \
| compute ÷ comm | speed-up 2 / 4 / 8 |
|---|---|---|---|---|---|---|
{chr(10).join(lines)}

`tests/test_data_parallel.py` runs `torchrun --standalone --nproc-per-node 2 --no-python aqexport
calibrate` on a tiny Llama and checks the plan against one process's: bit-identical here.
"""
    print(write_section("data-parallel", body))


if __name__ == "__main__":
    main()
