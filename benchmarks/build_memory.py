"""Peak resident memory and time of ``aqexport build`` per stage, and how they grow with the model.

Rows (issue 17's scaling table, as far as a build that holds the whole model goes):

* SmolLM2-135M, the shipped default (``_smollm2_variants``' ``affinequant tied``: affinequant
  w4a16g128, GPTQ rounding, int8 head read by the embedding), its plan reused; its source is the
  packaged GGUF, which ``build.stream: auto`` streams since 9eaaff6;
* a randomly initialised Llama of 1.17 B parameters (hidden 2048, 16 layers, intermediate 8192,
  32 heads / 8 KV heads, SmolLM2's tokenizer and vocabulary), RTN w4a16g128, written once to
  ``benchmarks/out/random-llama-1b``;
* a Llama-2-7B-shaped checkpoint (6.74 B parameters, 25.1 GiB of float32): a sparse safetensors
  file, because the build is refused from its header before any weight is read
  (``build.max_memory``), which is the row's point: today a 7B model does not fit this machine.

Each build is its own ``aqexport build`` process; stage peaks and times come from its
``report.json`` (``memory.peak_rss_mib``: the process's running peak at the end of each stage).

    python benchmarks/build_memory.py [--rows default 1b 7b]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import struct
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _report import commit_id, write_section  # noqa: E402
from _smollm2_variants import build as build_variant  # noqa: E402
from _smollm2_variants import write_config as variant_config  # noqa: E402
from skeleton import machine  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
RESULTS = ROOT / "benchmarks" / "results" / "build_memory.json"
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
AQEXPORT = str(Path(sys.executable).parent / "aqexport")


def smollm2_tokenizer():
    """The packaged SmolLM2's tokenizer, which the random checkpoints ship (and size their vocabulary by)."""
    from transformers import AutoTokenizer

    from aqexport.config import ModelSpec
    from aqexport.sources import resolve_source

    source = resolve_source(ModelSpec(source="default"))
    return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)


def random_llama_1b(folder: Path) -> Path:
    """Random weights in a Llama 3.2 1B-like shape, with SmolLM2's tokenizer."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_llama_7b(folder: Path) -> Path:
    """Random weights in Llama-2-7B's shape (hidden 4096, 32 layers, intermediate 11008) with
    SmolLM2's tokenizer and vocabulary (49152): 6.87 B parameters, 25.6 GiB of float32 in one
    safetensors shard per decoder block (as ``save_pretrained`` shards), written a block at a time
    so that writing it needs one block's memory. Entries are N(0, 0.02²), the transformers
    initialisation; norms are ones."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    tokenizer = smollm2_tokenizer()
    hidden, intermediate, layers, vocab = 4096, 11008, 32, len(tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).mul_(0.02)

    def block(i: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{i}."
        tensors = {f"{prefix}self_attn.{n}_proj.weight": normal(hidden, hidden) for n in "qkvo"}
        return tensors | {
            f"{prefix}mlp.gate_proj.weight": normal(intermediate, hidden),
            f"{prefix}mlp.up_proj.weight": normal(intermediate, hidden),
            f"{prefix}mlp.down_proj.weight": normal(hidden, intermediate),
            f"{prefix}input_layernorm.weight": torch.ones(hidden),
            f"{prefix}post_attention_layernorm.weight": torch.ones(hidden),
        }

    shards = [lambda: {"model.embed_tokens.weight": normal(vocab, hidden)}]
    shards += [lambda i=i: block(i) for i in range(layers)]
    shards.append(lambda: {"model.norm.weight": torch.ones(hidden), "lm_head.weight": normal(vocab, hidden)})
    weight_map, total = {}, 0
    for index, make in enumerate(shards):  # one shard's tensors in memory at a time
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.numel() * 4 for t in tensors.values())
        del tensors
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=1))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    tokenizer.save_pretrained(folder)
    config.to_json_file(folder / "config.json")  # last: it marks the checkpoint whole
    return folder


def sparse_llama_7b(folder: Path) -> Path:
    """A Llama-2-7B-shaped safetensors whose data is a hole: the header is all the check reads."""
    folder.mkdir(parents=True, exist_ok=True)
    hidden, intermediate, vocab, layers = 4096, 11008, 32000, 32
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    shapes["lm_head.weight"] = [vocab, hidden]
    for i in range(layers):
        block = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            shapes[f"{block}self_attn.{name}_proj.weight"] = [hidden, hidden]
        shapes |= {
            f"{block}mlp.gate_proj.weight": [intermediate, hidden],
            f"{block}mlp.up_proj.weight": [intermediate, hidden],
            f"{block}mlp.down_proj.weight": [hidden, intermediate],
            f"{block}input_layernorm.weight": [hidden],
            f"{block}post_attention_layernorm.weight": [hidden],
        }
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header)
    text += " " * (-len(text) % 8)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text.encode())
        handle.truncate(8 + len(text) + offset)
    from transformers import LlamaConfig

    heads = hidden // 128
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    config.to_json_file(folder / "config.json")
    return folder


#: The 7B rows' reduced budget: every forward over a 7B model on 2 cores costs ~0.2 s a token
#: and, its 25.6 GiB outgrowing the page cache, a read of the checkpoint. Verified at accuracy
#: level 0 (float activations), where the artifact computes what the fake-quant reference does:
#: at the default 4 (int8 activations) a random model's near-uniform logits differ by 7.5 % of
#: their largest (measured) and their top-1 choices by ties.
BUDGET_7B = {
    "calibration": {"samples": 4, "seqlen": 256},
    "evaluation": {"seqlen": 256, "max_windows": 2},
    "target": {"accuracy_level": 0},
}


def write_config(name: str, model: Path, stream: str = "auto", budget: dict | None = None) -> Path:
    import yaml

    budget = budget or {}
    config = {
        "model": {"source": str(model)},
        "quantization": {"recipe": "rtn", "preset": "w4a16g128"} | budget.get("quantization", {}),
        "calibration": {"data": str(DATA / "valid.txt"), **budget.get("calibration", {})},
        "evaluation": {
            "text": str(DATA / "test.txt"),
            **({"seqlen": 512, "max_windows": 4} | budget.get("evaluation", {})),
        },
        "build": {"stream": stream},
        **({"target": budget["target"]} if "target" in budget else {}),
        "output": {"dir": str(OUT / "artifacts" / name)},
    }
    path = OUT / "artifacts" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_build(config: Path) -> dict:
    """One ``aqexport build`` process (an artifact already up to date is read, not rebuilt: its
    report holds the build that made it); ``build_s`` is the sum of the report's stage times."""
    import yaml

    start = time.perf_counter()
    done = subprocess.run([AQEXPORT, "build", str(config)], capture_output=True, text=True)
    said = done.stderr.strip().splitlines()[-1:]
    row = {"wall_s": time.perf_counter() - start, "exit": done.returncode, "said": said}
    if done.returncode == 0:
        output = Path(yaml.safe_load(config.read_text())["output"]["dir"])
        report = json.loads((output / "report.json").read_text())
        timings = report["timings"]
        row |= {"peak_rss_mib": report["memory"]["peak_rss_mib"], "timings": timings, "build_s": sum(timings.values())}
        row["verification"] = _verification(report["verification"])
    return row


def _verification(verification: dict) -> dict:
    """What the build's verification found: the artifact's logits and perplexity against the
    (block-streamed, for a streamed build) PyTorch fake-quant model of the same plan."""
    parity, ppl, greedy = verification["logits_parity"], verification.get("perplexity", {}), verification["greedy"]
    return {
        "prefill_max_rel": parity["prefill"]["max_rel"],
        "step_max_rel": parity["decode_step"]["max_rel"],
        "ppl_onnx": ppl.get("onnx", {}).get("perplexity"),
        "ppl_pytorch": ppl.get("pytorch", {}).get("perplexity"),
        "greedy_identical": greedy.get("identical_to_pytorch"),
        "greedy_first_divergence": greedy.get("first_divergence"),
        "greedy_reference": greedy.get("pytorch_reference", "generate"),
        "accuracy_level": (verification.get("accuracy_level") or {}).get("chosen", 0),
    }


#: row key (``--rows``) -> the table's row name
ROWS = {
    "default": "SmolLM2-135M, shipped default (affinequant, GPTQ)",
    "1b": "random Llama 1.17B, RTN w4a16g128",
    "1b-streamed": "random Llama 1.17B, RTN w4a16g128, streamed (build.stream: always)",
    "7b": "Llama-2-7B shape 6.74B, RTN w4a16g128, whole (build.stream: never)",
    "7b-streamed": "random Llama 6.87B (Llama-2-7B shape), RTN w4a16g128, streamed (build.stream: auto)",
    "7b-streamed-resumed": "the same, its plan read from the row above's plan_dir",
    "7b-streamed-gptq": "random Llama 6.87B, RTN transforms + GPTQ rounding w4a16g128, streamed",
    "7b-streamed-affinequant": "random Llama 6.87B, AffineQuant w4a16g128 (2 epochs), streamed",
}

#: the 7B rows beside RTN: their artifact's name and the recipe they add to ``BUDGET_7B``
RECIPES_7B = {
    "7b-streamed-gptq": (  # Hessians from the training windows alone, not GPTQ's default 32768 tokens
        "random-llama-7b-gptq",
        {"quantization": {"rounding": {"method": "gptq", "tokens": 1024}}, "calibration": {"head_tokens": 1024}},
    ),
    # one window, two epochs: a 7B block calibrates in ~46 s alone here (143 s while the diagonal
    # norm transforms were applied as d × d matrices)
    "7b-streamed-affinequant": (
        "random-llama-7b-affinequant",
        {"quantization": {"recipe": "affinequant"}, "calibration": {"samples": 1, "epochs": 2, "head_tokens": 1024}},
    ),
}


#: random checkpoints by size: their folder and what writes them
CHECKPOINTS = {"1b": ("random-llama-1b", random_llama_1b), "7b": ("random-llama-7b", random_llama_7b)}


def checkpoint(size: str) -> Path:
    """The random checkpoint, written by a process of its own when missing: a build's
    ``ru_maxrss`` starts at its parent's peak (Linux carries it across fork and exec), and
    writing the 1.17B model holds it whole (4.9 GiB), which the build's report would then show
    as its own peak."""
    folder = OUT / CHECKPOINTS[size][0]
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--write-checkpoint", size], check=True)
    return folder


def measure(key: str, resume: bool = False) -> dict:
    if key == "default":
        build_variant("affinequant tied")
        return {"params_b": 0.1345, **run_build(variant_config("affinequant tied"))}
    if key == "1b":
        big = checkpoint("1b")
        return {"params_b": 1.17, **run_build(write_config("random-llama-1b", big, "never"))}
    if key == "1b-streamed":  # and its artifact against the one holding the whole model
        big = checkpoint("1b")
        row = {"params_b": 1.17, **run_build(write_config("random-llama-1b-streamed", big, "always"))}
        whole, streamed = OUT / "artifacts" / "random-llama-1b", OUT / "artifacts" / "random-llama-1b-streamed"
        if (whole / "model.onnx").exists() and row["exit"] == 0:
            row["same_bytes_as_whole"] = all(
                filecmp.cmp(whole / name, streamed / name, shallow=False) for name in ("model.onnx", "model.onnx.data")
            )
        return row
    if key in RECIPES_7B:  # a fresh plan, calibrated in the build (--resume: from an interrupted one's blocks)
        name, recipe = RECIPES_7B[key]
        budget = BUDGET_7B | recipe | {"calibration": BUDGET_7B["calibration"] | recipe.get("calibration", {})}
        for leftover in (name,) if resume else (name, f"{name}.plan"):
            shutil.rmtree(OUT / "artifacts" / leftover, ignore_errors=True)
        row = run_build(write_config(name, checkpoint("7b"), "auto", budget))
        if row["exit"] == 0:
            report = json.loads((OUT / "artifacts" / name / "report.json").read_text())
            row["resumed_from_block"] = report["calibration"].get("resumed_from_block", 0)
        return {"params_b": 6.87, **row}
    if key.startswith("7b-streamed"):  # a fresh plan, or the one the last fresh build left
        big = checkpoint("7b")
        if key == "7b-streamed":
            shutil.rmtree(OUT / "artifacts" / "random-llama-7b.plan", ignore_errors=True)
        shutil.rmtree(OUT / "artifacts" / "random-llama-7b", ignore_errors=True)
        return {"params_b": 6.87, **run_build(write_config("random-llama-7b", big, "auto", BUDGET_7B))}
    sparse = sparse_llama_7b(OUT / "sparse-llama-7b")
    return {"params_b": 6.74, **run_build(write_config("sparse-llama-7b", sparse, "never"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--rows",
        nargs="*",
        choices=list(ROWS),
        default=list(ROWS),
        help="re-measure these; keep the others recorded (none: rewrite the section from the records)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="the fresh-plan 7B rows resume the plan an interrupted run left (the row says from which block)",
    )
    parser.add_argument("--write-checkpoint", choices=list(CHECKPOINTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_checkpoint:
        name, write = CHECKPOINTS[args.write_checkpoint]
        write(OUT / name)
        return
    recorded = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": {}}
    rows = {}
    for key, name in ROWS.items():
        if key in args.rows:
            rows[name] = {**measure(key, args.resume), "commit": commit_id(), "date": str(date.today())}
        elif name in recorded["rows"]:  # rows written before per-row commits carry the file's
            rows[name] = {"commit": recorded.get("commit"), **recorded["rows"][name]}
    RESULTS.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    stages = ("load", "capture", "calibrate", "lower", "write", "verify")
    lines, refusals = [], []
    for name, row in rows.items():
        if row["exit"] != 0:
            lines.append(f"| {name} | {row['commit']} | refused in {row['wall_s']:.1f} s (below) |" + " — |" * 7)
            refusals.append(f"{name}: `{' '.join(row['said'])}`")
            continue
        peaks, times = row["peak_rss_mib"], row["timings"]
        cells = " | ".join(f"{times[s]:.0f} s / {peaks[s]:.0f}" for s in stages)
        fp32 = row["params_b"] * 4e9 / 2**20
        lines.append(
            f"| {name} | {row['commit']} | {row['build_s']:.0f} s | {cells} | {max(peaks.values()) / fp32:.1f}× |"
        )
        if "verification" in row and row["params_b"] > 5:
            v = row["verification"]
            greedy = (
                "the same 64 greedy tokens"
                if v["greedy_identical"]
                else (f"greedy tokens first differ at {v['greedy_first_divergence']}")
            )
            refusals.append(
                f"{name}, verified at accuracy level {v['accuracy_level']} against the block-streamed PyTorch "
                f"fake-quant model of the same plan: logits within {v['prefill_max_rel']:.1e} (prefill) and "
                f"{v['step_max_rel']:.1e} (cached step) of their largest, perplexity {v['ppl_onnx']:.1f} (ONNX) "
                f"against {v['ppl_pytorch']:.1f} (PyTorch; a random model's are near the vocabulary's size), "
                f"{greedy} ({v['greedy_reference'].split(':')[0]})."
            )
        if row.get("resumed_from_block"):
            refusals.append(
                f"{name}: its calibrate stage resumed at block {row['resumed_from_block']} the plan an "
                "interrupted process of the same config had filled (`--resume`): the stage times and peaks "
                "above are the resuming process's."
            )
        if "same_bytes_as_whole" in row:
            same = "the same bytes as" if row["same_bytes_as_whole"] else "**different bytes from**"
            refusals.append(f"{name}: model.onnx and model.onnx.data are {same} the unstreamed row's.")
    body = f"""
## Build memory and time per stage, by model size

`python benchmarks/build_memory.py` (`--rows` re-measures some rows and keeps the others: each
row names the commit it was measured at), last run {date.today()}. Machine: {machine()}. Each row is
one `aqexport build` process (the shipped default's artifact is the one its benchmarks use, read
if up to date); per stage: its seconds / the process's peak RSS in MiB at
the end of it (`report.json` `memory.peak_rss_mib`, a running peak). The last column is the
build's peak over the model's float32 weights. The streamed rows hold one decoder block at a
time (`build.stream`, `aqexport.streamed_model`), the others the whole model. The whole 7B row is
refused from its safetensors headers by `build.max_memory` (default 90 % of RAM) before any
weight is read (its checkpoint is a sparse file); the streamed 7B row is a random Llama-2-7B-shaped
model (SmolLM2's 49152-token vocabulary: 6.87 B parameters, 25.6 GiB of float32 in 34
safetensors shards, `random_llama_7b`), which `stream: auto` streams, at a reduced budget
(`BUDGET_7B`: 4 × 256 calibration windows, 2 × 256 evaluation windows, accuracy level 0). The
GPTQ row takes its Hessians from those windows (1024 tokens, not GPTQ's default 32768); the
AffineQuant row trains each block on one of them for 2 epochs (`RECIPES_7B`), in the default
norm-side form for a weight-only preset: diagonal, which calibration applies as a vector since
09eed60 (a 7B-shaped block then calibrates in 46 s alone, 143 s before, when each step multiplied
the block's weights by 4096² matrices; `docs/transforms.md`). Its 09eed60 row ran while the
clean-clone CI shared the two cores for 44 of its 66 minutes, so its times are not the build's
alone; peak RSS does not depend on it. Its plan (format 5) stored each diagonal as a 4096²
float64 matrix: 15 GiB on disk, 8 of it those zeros (492 MB a block file, 2 × 128 MiB of it the
two diagonals); plan format 6 (e05cac4) stores the vector, 224 MB a block, about 7 GB a plan (by
arithmetic from that block file; the row was not rebuilt). A frozen block's input hooks hold its
inverse as a vector (fe19316). Its checkpoint outgrows the page cache, so every forward over it
reads it from disk. Streamed rows measured before e45f14c held the model's float edges
(embedding, norm, head: 1.6 GiB at 7B) through ONNX Runtime's verification; since, they wait in a temporary file
(`streamed_model.edges_released`). The first 7B row calibrates its plan in the build; the second
read the plan an earlier fresh build left (545ef50: the same bytes, since the freeze is unchanged
but for its memory), so its calibrate stage only propagates activations. That earlier fresh build,
before the edge spill and the one-linear-at-a-time freeze (9dc861a), at accuracy level 4, peaked at
7128 MiB in calibrate and 8688 MiB in verify (1958 s).

| model, recipe | commit | build | load | capture | calibrate | lower | write | verify | peak ÷ fp32 weights |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

{chr(10).join(refusals)}

Earlier measurements of the 1.17B rows (same script): whole model 9073 MiB (verify; 0363406) before
verification released the model ahead of ONNX Runtime (84ba9b6); streamed 5003 MiB (verify;
6665cad), then 3567 MiB (verify; d6fe119, 918 s while CI shared the cores) before the edge spill
(e45f14c) and the one-linear-at-a-time freeze (9dc861a). The whole-model 1.17B row was measured
while the clean-clone CI shared the machine's 2 cores (it took 442 s alone at e2144fc); peak RSS
does not depend on it.

The SmolLM2 row: since 9eaaff6 the packaged GGUF streams (`gguf_tensors`: dequantized once into
float shards in the build's scratch folder, one block resident at a time), and the parity ladder's
folded rung computes its weights a block at a time. Before (e2144fc, the model loaded whole, plan
reused): 3132 MiB; streamed, 1777 MiB (526f859; verify, calibrate 1652) before the memory work
of dcc3c4a and da538db (perplexity scored 64 positions at a time, the fake-quant step recomputed in
the backward, the edges on disk while blocks calibrate and while the folded rung's session runs,
no block state carried into the next block). Its row above (da538db) was measured while a 7B
calibration probe shared the two cores: its stage times are not comparable. A fresh build (its
plan calibrated too) of the same config peaked at 2880 MiB before (d2495e9, model whole) and
1863 MiB after (6406806, streamed; calibrate 1840, verify 1863); those two were one-off
`aqexport build --force` runs of the variant's config with an empty `plan_dir`, each while tests
shared the cores (their times are not comparable). Fresh builds of the shipped default since,
streamed and whole side by side: the "Streamed against whole" section (`benchmarks/stream_speed.py`).
"""
    print(write_section("build-memory", body))


if __name__ == "__main__":
    main()
