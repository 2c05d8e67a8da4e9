"""Side by side with the quantizers people use today (issue 18): one run, one perplexity code.

Every row is an ONNX artifact of SmolLM2-135M-Instruct (the packaged GGUF weights), scored by
the same ``aqexport eval`` (WikiText-2 test, 40 windows of 512 tokens) and timed by the same
``aqexport bench`` (prefill 512, decode 64 tokens after 512), artifacts taking turns over
``--rounds`` rounds. Two rows are re-scored by an independent loop over plain
``onnxruntime.InferenceSession`` calls (``plain_ort_perplexity``: its own tokenization, feeds
and log-softmax, no aqexport code) on the first ``--spot-windows`` windows, next to
``aqexport eval`` on the same windows.

Rows (weight formats are read off each graph, not assumed: ``formats``):

* ``aqexport affinequant+gptq``: ``examples/smollm2-affinequant-w4a16g128.yaml`` as shipped
  (``benchmarks/_smollm2_variants.py``), and ``OUR_ROWS``: the same file with only the recipe
  and rounding changed (omniquant, smoothquant, plain GPTQ, RTN, each with and without GPTQ
  rounding where it has it; llm_int8, W8A8 per token with the outlier split, its own format);
* ``ort default g128`` / ``ort hqq g128``: ONNX Runtime's ``MatMulNBitsQuantizer`` (its default
  round-to-nearest, and HQQ) on our fp32 artifact's graph, blocks of 128, asymmetric, accuracy
  level 4 as the builder's; every MatMul it finds (the LM head included) goes to 4 bits;
* ``ort gptq g128`` / ``ort rtn (inc)``: the same quantizer's GPTQ (calibrated on
  ``GPTQ_WINDOWS`` windows of WikiText-2 valid through ``CalibrationReader``) and RTN configs,
  which run onnxruntime's bundled port of Intel Neural Compressor's weight-only code
  (``onnxruntime/quantization/neural_compressor``); where a quantizer raises, the row records
  the exception instead of figures;
* ``ort quantize_dynamic int8``: ``onnxruntime.quantization.quantize_dynamic`` on the fp32 graph
  (int8 weights per channel, activations quantized at run time);
* ``builder int4`` / ``builder int4 g128``: ``python -m onnxruntime_genai.models.builder -p int4
  -e cpu``, its default (blocks of 32) and ``--extra_options block_size=128``.

Build time: ours from the build's report (its stages' wall times); ORT's and the builder's
timed around their calls. All in one process per step, 2 threads.

    python benchmarks/peers.py [--rounds 2] [--repeats 2] [--spot-windows 4] [--quick]
    python benchmarks/peers.py --add-second-text   # score recorded rows on the second text only
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _builds import DATA, OUT  # noqa: E402
from _report import commit_id, write_section  # noqa: E402
from _smollm2_variants import build as build_variant  # noqa: E402
from execution import ARTIFACTS, build_builder, build_ours, size_bytes  # noqa: E402
from skeleton import machine  # noqa: E402

RESULTS = OUT / "peers.json"
TEXT = DATA / "test.txt"
#: the ranking's second text: the Jargon File 4.4.7, public domain (``benchmarks/data/``)
SECOND_TEXT = ROOT / "benchmarks" / "data" / "jargon-4.4.7.txt"
#: the files of our fp32 artifact an ORT-quantized copy keeps (not manifest/report: their hashes
#: and figures are of the fp32 graph)
RUNTIME_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json")


GPTQ_WINDOWS = (8, 256)  # windows × tokens fed to ORT's GPTQ

#: our rows: row name -> ``benchmarks/_smollm2_variants.py`` variant. Each is the shipped example
#: with only the recipe / rounding changed, so all share its edges (int8 head, tied embedding) and
#: its calibration budget; the first is the shipped default as it is.
OUR_ROWS = {
    "aqexport affinequant+gptq": "affinequant",
    "aqexport affinequant": "affinequant nearest",
    "aqexport omniquant+gptq": "omniquant gptq",
    "aqexport omniquant": "omniquant",
    "aqexport smoothquant+gptq": "smoothquant gptq",
    "aqexport smoothquant": "smoothquant",
    "aqexport gptq": "rtn gptq",
    "aqexport rtn": "rtn",
    "aqexport llm_int8": "llm int8",
}


def prefill_feeds(inputs: dict[str, type], decoder: dict, tokens: list[int], past_length: int) -> dict:
    """One batch-1 prefill of ``tokens`` from an empty cache, for a graph with ``inputs`` (name →
    float dtype of its KV inputs): ``past_length`` 0, or for shared-buffer graphs a zero buffer
    of the window's length. ``decoder``: ``genai_config.json``'s ``model.decoder``."""
    ids = np.asarray(tokens, dtype=np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "position_ids" in inputs:
        feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
    shape = (1, decoder["num_key_value_heads"], past_length, decoder["head_size"])
    feeds.update({name: np.zeros(shape, dtype) for name, dtype in inputs.items() if name.startswith("past_key_values")})
    return feeds


class CalibrationReader(CalibrationDataReader):
    """ORT's ``CalibrationDataReader`` (its GPTQ iterates over one) for our fp32 graph: prefill feeds of WikiText-2
    valid windows with an empty cache (a zero shared buffer of the window's length)."""

    def __init__(self, directory: Path, windows: int, length: int) -> None:
        import onnx
        from transformers import AutoTokenizer

        decoder = json.loads((directory / "genai_config.json").read_text())["model"]["decoder"]
        tokens = AutoTokenizer.from_pretrained(directory)(
            (DATA / "valid.txt").read_text(encoding="utf-8")[:400_000], add_special_tokens=False
        )["input_ids"]
        graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
        inputs = {value.name: np.float32 for value in graph.input}  # the fp32 graph
        self.feeds = [
            prefill_feeds(inputs, decoder, tokens[index * length : (index + 1) * length], length)
            for index in range(windows)
        ]
        self.rewind()

    def get_next(self) -> dict | None:
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = iter(self.feeds)


def _fp32_artifact() -> Path:
    return build_ours("aqexport fp32", {"recipe": "none"}, rebuild=False)


def _copy_runtime_files(source: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)


def ort_nbits(name: str, algorithm: str) -> tuple[Path | None, float | None, str | None]:
    """``MatMulNBitsQuantizer`` on the fp32 graph; (directory, seconds, why not run)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    fp32 = _fp32_artifact()
    configs = {
        "default": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False, accuracy_level=4),
        "hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=128, bits=4),
        "rtn": lambda: nbits.RTNWeightOnlyQuantConfig(),
        "gptq": lambda: nbits.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=CalibrationReader(fp32, *GPTQ_WINDOWS), block_size=128
        ),
    }

    def quantize(directory: Path) -> None:
        quantizer = nbits.MatMulNBitsQuantizer(
            onnx.load(str(fp32 / "model.onnx")),
            bits=4,
            block_size=128,
            is_symmetric=False,
            accuracy_level=4,
            algo_config=configs[algorithm](),
        )
        quantizer.process()
        _copy_runtime_files(fp32, directory)
        quantizer.model.save_model_to_file(str(directory / "model.onnx"), use_external_data_format=True)

    return _ort_quantized(name, quantize)


def ort_dynamic_int8(name: str) -> tuple[Path | None, float | None, str | None]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _fp32_artifact()

    def quantize(directory: Path) -> None:
        _copy_runtime_files(fp32, directory)
        quantize_dynamic(
            fp32 / "model.onnx",
            directory / "model.onnx",
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            use_external_data_format=True,
        )

    return _ort_quantized(name, quantize)


def _ort_quantized(name: str, quantize) -> tuple[Path | None, float | None, str | None]:
    """(directory, seconds, why not run) of ``quantize(directory)``, an ONNX Runtime quantizer's
    run; an exception is the row's record (which quantizer failed, and on what), not a crash."""
    directory = ARTIFACTS / name.replace(" ", "-")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return directory, timed_build(directory, lambda: quantize(directory), "quantize_seconds.json"), None
    except Exception as error:
        return None, None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def timed_build(directory: Path, make, record: str = "build_seconds.json") -> float:
    """Seconds of ``make()`` (a quantizer's or the builder's run), remembered beside the artifact
    in ``record`` and read back on later runs, which then do not make it again."""
    timing = directory / record
    if timing.is_file() and (directory / "model.onnx").exists():
        return json.loads(timing.read_text())["seconds"]
    start = time.perf_counter()
    make()
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds}))
    return seconds


def our_build_seconds(directory: Path) -> float:
    return sum(json.loads((directory / "report.json").read_text())["timings"].values())


def formats(directory: Path) -> dict:
    """Weight formats as the graph has them: block size and symmetry of the 4-bit matmuls, the LM
    head's and the embedding's formats."""
    import onnx

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    logits = producers.get("logits")
    while logits is not None and logits.op_type not in ("MatMulNBits", "MatMul", "MatMulInteger", "Gemm"):
        logits = producers.get(logits.input[0])
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]

    def attribute(node, key, default=None):
        return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)

    def matmul_format(node) -> str:
        if node is None:
            return "?"
        if node.op_type == "MatMulNBits":
            zero = "asym" if len(node.input) > 3 and node.input[3] else "sym"
            level = attribute(node, "accuracy_level", 0)
            return f"int{attribute(node, 'bits')} g{attribute(node, 'block_size')} {zero} L{level}"
        if node.op_type == "MatMulInteger" or (
            node.input[1] in producers and "Dequantize" in producers[node.input[1]].op_type
        ):
            return "int8"
        return "fp32"

    gathers = [
        node
        for node in graph.node
        if node.op_type in ("Gather", "GatherBlockQuantized") and node.input[1] == "input_ids"
    ]
    embedding = "?"
    if gathers:
        gather = gathers[0]
        embedding = (
            f"int{attribute(gather, 'bits', 4)} g{attribute(gather, 'block_size')}"
            if gather.op_type == "GatherBlockQuantized"
            else "fp32"
        )
    body = [n for n in nbits if n is not logits]
    body_format = sorted({matmul_format(n) for n in body}) or sorted(
        {matmul_format(n) for n in graph.node if n.op_type in ("MatMul", "MatMulInteger") and n is not logits}
    )
    return {"weights": ", ".join(body_format), "lm_head": matmul_format(logits), "embedding": embedding}


def _cli_json(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "aqexport.cli", *args, "--json"], check=True, cwd=ROOT, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def our_eval(directory: Path, windows: int, text: Path = TEXT) -> float:
    return _cli_json("eval", str(directory), "--text", str(text), "--seqlen", "512", "--max-windows", str(windows))[
        "perplexity"
    ]


def add_second_text(results: dict, windows: int) -> None:
    """``perplexity_second`` of every runnable row on ``SECOND_TEXT`` (same windows and code)."""
    for name, row in results["rows"].items():
        if row.get("directory"):
            row["perplexity_second"] = our_eval(Path(row["directory"]), windows, SECOND_TEXT)
            print(name, "second text", row["perplexity_second"], flush=True)


def plain_ort_perplexity(directory: Path, windows: int) -> float:
    """An independent scorer: ``transformers`` tokenizer, plain ``InferenceSession.run`` with an
    empty cache per window (a zero-length past, or for shared-buffer graphs a zero buffer of the
    window's length), float64 log-softmax in NumPy."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    genai = json.loads((directory / "genai_config.json").read_text())
    shared = bool(genai.get("search", {}).get("past_present_share_buffer"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
    inputs = {value.name: np.float16 if "float16" in value.type else np.float32 for value in session.get_inputs()}
    total, count = 0.0, 0
    for index in range(windows):
        window = np.asarray(ids[index * 512 : (index + 1) * 512], dtype=np.int64)[None]
        feeds = prefill_feeds(inputs, genai["model"]["decoder"], window[0].tolist(), 512 if shared else 0)
        logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
        log_probs = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        total -= log_probs[np.arange(511), window[0, 1:]].sum()
        count += 511
    return float(np.exp(total / count))


def bench(directory: Path, repeats: int) -> dict:
    return _cli_json(
        "bench",
        str(directory),
        "--repeats",
        str(repeats),
        "--threads",
        "2",
        "--decode-context",
        "512",
        "--decode-tokens",
        "64",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--spot-windows", type=int, default=4)
    parser.add_argument(
        "--quick", action="store_true", help="write peers-quick.json and the peers-quick section (benchmarks/all.py)"
    )
    parser.add_argument("--render-only", action="store_true", help="re-render the recorded results")
    parser.add_argument(
        "--add-second-text", action="store_true", help="score the recorded rows on the second text and re-render"
    )
    args = parser.parse_args()
    results_file = OUT / "peers-quick.json" if args.quick else RESULTS
    section = "peers-quick" if args.quick else "peers"
    if args.render_only:  # formats re-read from the graphs (static facts), figures as recorded
        results = json.loads(results_file.read_text())
        for row in results["rows"].values():
            if row.get("directory"):
                row["formats"] = formats(Path(row["directory"]))
        results_file.write_text(json.dumps(results, indent=1))
        print(write_section(section, render(results)))
        return
    if args.add_second_text:
        results = json.loads(results_file.read_text())
        add_second_text(results, args.windows)
        results_file.write_text(json.dumps(results, indent=1))
        print(write_section(section, render(results)))
        return
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for name, variant in OUR_ROWS.items():
        directory = build_variant(variant)
        rows[name] = {"directory": directory, "build_seconds": our_build_seconds(directory)}
    for name, algorithm in (
        ("ort default g128", "default"),
        ("ort hqq g128", "hqq"),
        ("ort rtn (inc)", "rtn"),
        ("ort gptq g128", "gptq"),
    ):
        directory, seconds, failure = ort_nbits(name, algorithm)
        rows[name] = {"directory": directory, "build_seconds": seconds, "failure": failure}
    directory, seconds, failure = ort_dynamic_int8("ort quantize_dynamic int8")
    rows["ort quantize_dynamic int8"] = {"directory": directory, "build_seconds": seconds, "failure": failure}
    for name, options in (("builder int4", None), ("builder int4 g128", "block_size=128")):
        directory = ARTIFACTS / name.replace(" ", "-")
        if (directory / "model.onnx").exists() and not (directory / "build_seconds.json").is_file():
            shutil.rmtree(directory)  # rebuilt once so its build is timed
        directory.mkdir(parents=True, exist_ok=True)
        seconds = timed_build(directory, lambda name=name, options=options: build_builder(name, "int4", options))
        rows[name] = {"directory": directory, "build_seconds": seconds}
    runnable = {name: row for name, row in rows.items() if row.get("directory") is not None}
    for name, row in runnable.items():
        row["formats"] = formats(row["directory"])
        row["bytes"] = size_bytes(row["directory"])
        row["perplexity"] = our_eval(row["directory"], args.windows)
        print(name, row["formats"], row["perplexity"], flush=True)
    for name in ("aqexport affinequant+gptq", "builder int4"):
        row = runnable[name]
        row["spot"] = {
            "windows": args.spot_windows,
            "aqexport_eval": our_eval(row["directory"], args.spot_windows),
            "plain_onnxruntime": plain_ort_perplexity(row["directory"], args.spot_windows),
        }
        print(name, row["spot"], flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in runnable}
    for _ in range(args.rounds):
        for name, row in runnable.items():  # round-robin against drift
            runs[name].append(bench(row["directory"], args.repeats))
    for name, row in runnable.items():
        row["decode"] = statistics.median(r["decode_tokens_per_second"]["median"] for r in runs[name])
        row["prefill_512"] = statistics.median(r["prefill_tokens_per_second"]["512"]["median"] for r in runs[name])
    results = {
        "machine": machine(),
        "commit": commit_id(),
        "date": date.today().isoformat(),
        "args": vars(args),
        "rows": {
            name: {**row, "directory": str(row["directory"]) if row.get("directory") else None}
            for name, row in rows.items()
        },
    }
    add_second_text(results, args.windows)
    results_file.write_text(json.dumps(results, indent=1))
    print(write_section(section, render(results)))


def render(results: dict) -> str:
    rows = results["rows"]
    lines = [
        "## Peers: SmolLM2-135M, ours beside ONNX Runtime's quantizers and the genai builder"
        + (" (quick run)" if results["args"].get("quick") else ""),
        "",
        f"`python benchmarks/peers.py` at {results['commit']}, {results['date']}; {results['machine']}.",
        f"Perplexity: `aqexport eval`, WikiText-2 test, {results['args']['windows']} × 512. Speed: `aqexport bench`, "
        f"2 threads, median of {results['args']['rounds']} round-robin rounds; decode 64 tokens after 512.",
        "Formats are read off each graph (MatMulNBits bits / block / zero points / accuracy level L; the LM "
        "head's matmul; the embedding's Gather).",
        "",
        "| row | weights | LM head | embedding | size MiB | ppl WikiText-2 | ppl Jargon File | prefill 512 tok/s "
        "| decode tok/s | build s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if row.get("directory") is None:
            lines.append(f"| {name} | not run: {row['failure']} | | | | | | | | |")
            continue
        f = row["formats"]
        lines.append(
            f"| {name} | {f['weights']} | {f['lm_head']} | {f['embedding']} | {row['bytes'] / 2**20:.1f} | "
            f"{row['perplexity']:.3f} | {row.get('perplexity_second', float('nan')):.3f} | {row['prefill_512']:.0f} | "
            f"{row['decode']:.1f} | {row['build_seconds']:.0f} |"
        )
    lines += [
        "",
        "Independent spot check (plain `onnxruntime.InferenceSession`, own tokenization and log-softmax):",
        "",
    ]
    for name, row in rows.items():
        if "spot" in row:
            spot = row["spot"]
            lines.append(
                f"- {name}: first {spot['windows']} windows, `aqexport eval` {spot['aqexport_eval']:.4f}, "
                f"plain onnxruntime {spot['plain_onnxruntime']:.4f}"
            )
    four_bit = {
        name: row
        for name, row in rows.items()
        if row.get("directory") and row["formats"]["weights"].startswith("int4 g128 asym")
    }
    if four_bit:
        ranked = sorted(four_bit, key=lambda name: four_bit[name]["perplexity"])
        best = ranked[0]
        verdict = (
            "the shipped default."
            if best == "aqexport affinequant+gptq"
            else "**not the shipped default (aqexport affinequant+gptq)**; the LM head / embedding formats "
            "differ per row (columns above)."
        )
        lines += [
            "",
            f"Lowest perplexity among the 4-bit, blocks-of-128, asymmetric rows: **{best}**, {verdict}",
            "Their order, WikiText-2: " + " < ".join(f"{name} {four_bit[name]['perplexity']:.3f}" for name in ranked),
        ]
        rounded_by_gptq = ("+gptq", "aqexport gptq")
        nearest = [n for n in ranked if n.startswith("aqexport") and not n.endswith(rounded_by_gptq)]
        if "aqexport affinequant" in nearest and nearest[0] != "aqexport affinequant":
            lines.append(
                f"Among our rows rounded to nearest, **{nearest[0]}** is below affinequant: "
                + " < ".join(f"{name} {four_bit[name]['perplexity']:.3f}" for name in nearest)
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
