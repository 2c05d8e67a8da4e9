"""``aqexport`` command line: build, calibrate, run, eval, bench, inspect, verify, report, diff.

Every failure the user can act on is an ``AqexportError`` and prints as one line
``error: <cause> — fix: <fix>`` with exit status 2 for bad input and 1 for runtime failures.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from aqexport.artifact_refs import check_artifact_references
from aqexport.errors import AqexportError, ConfigError

__all__ = ["main"]

PROVIDERS = click.Choice(["cpu", "cuda", "xnnpack", "nnapi", "coreml", "qnn"])


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise AqexportError(
            f"no usable tokenizer in '{directory}' ({str(exc).splitlines()[0][:120]})",
            "pass an artifact directory built by 'aqexport build'",
        ) from None


def _artifact_dir(value: str) -> Path:
    path = Path(value)
    if not (path / "model.onnx").is_file():
        raise AqexportError(
            f"'{path}' is not an artifact directory (no model.onnx)", "pass the output directory of 'aqexport build'"
        )
    check_artifact_references(path)
    return path


def _no_verify_option(command):
    return click.option(
        "--no-verify",
        "no_verify",
        is_flag=True,
        help="Skip checking the artifact's files against the sha256 in its manifest.json.",
    )(command)


def _verify(directory: Path, no_verify: bool) -> None:
    """Refuse an artifact whose files fail its manifest (``ConfigError``, exit 2), unless
    ``--no-verify``; one note on stderr when it has no manifest to check against."""
    if no_verify:
        return
    from aqexport.integrity import check_artifact

    if not check_artifact(directory).has_manifest:
        click.echo(f"note: '{directory}' has no manifest.json; its files were not verified", err=True)


@click.group()
@click.version_option(package_name="aqexport")
@click.option("-v", "--verbose", is_flag=True, help="Log each stage and pass.")
def cli(verbose: bool) -> None:
    """Compile Hugging Face causal LMs into quantized ONNX artifacts for ONNX Runtime."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Override output.dir.")
@click.option(
    "--force",
    is_flag=True,
    help="Rebuild even if the output already holds an intact artifact of this config, weights and tool versions.",
)
def build(config: Path, output: Path | None, force: bool) -> None:
    """Build the artifact described by CONFIG (a model.yaml).

    An output directory that already holds an artifact with the same build identity (config,
    source weights, aqexport and dependency versions; see manifest.json's build_identity) whose
    files match its manifest is left as it is ("up to date"); --force rebuilds it."""
    from rich.console import Console

    from aqexport.config import load_config
    from aqexport.output_guard import check_output_dir
    from aqexport.pipeline import build as run_build

    console = Console(stderr=True)
    cfg = load_config(config)
    check_output_dir(cfg, output if output is not None else cfg.output.dir, config)
    stages: list[str] = []

    def on_stage(name: str) -> None:
        stages.append(name)
        status.update(f"[bold]{name}[/bold]")

    with console.status("starting") as status:
        out = run_build(
            cfg,
            config.parent.resolve(),
            output,
            on_stage=on_stage,
            on_block=lambda done, total: status.update(f"[bold]calibrate[/bold]: block {done}/{total}"),
            force=force,
        )
    report = json.loads((out / "report.json").read_text())
    verification = report.get("verification", {})
    if stages == ["up to date"]:
        console.print(
            f"[green]up to date[/green] {out}  (same config, weights and versions; files match manifest.json; "
            "--force rebuilds)"
        )
        return
    console.print(f"[green]built[/green] {out}  ({report['model_bytes'] / 2**20:.1f} MiB model)")
    calibration = report.get("calibration")
    if calibration:
        console.print(
            f"  {report['quantization']['recipe']} {report['quantization']['preset']}: plan {cfg.plan_dir()}"
            f" ({calibration['calibration_seconds']:.0f} s, resumed at block {calibration['resumed_from_block']})"
        )
        if calibration.get("fp_perplexity"):
            console.print(f"  perplexity (fp PyTorch): {calibration['fp_perplexity']:.4f}")
    parity = verification.get("logits_parity", {}).get("prefill", {})
    if parity:
        console.print(f"  logits max-abs vs PyTorch: {parity['max_abs']:.2e}")
    ppl = verification.get("perplexity")
    if ppl:
        line = f"  perplexity (onnx): {ppl['onnx']['perplexity']:.4f}"
        if "pytorch" in ppl:
            line += f"  pytorch: {ppl['pytorch']['perplexity']:.4f}  rel diff {ppl['relative_difference']:.2e}"
        console.print(line)
    greedy = verification.get("greedy")
    if greedy and greedy.get("identical_to_pytorch") is not None:
        console.print(f"  greedy {greedy['tokens']} tokens identical to PyTorch: {greedy['identical_to_pytorch']}")
    if (out / "report.html").is_file():
        console.print(f"  report: {out / 'report.html'}  (aqexport report --open)")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
def calibrate(config: Path) -> None:
    """Calibrate CONFIG's recipe into a QuantPlan and report its fake-quant perplexity.

    Resumes from the last finished block if a plan for the same recipe and model is there.
    Under torchrun (torchrun --standalone --nproc-per-node N --no-python aqexport calibrate
    CONFIG) the N ranks share each training step's calibration.windows_per_step windows and
    rank 0 writes the plan; `aqexport build CONFIG` then lowers it.
    """
    from rich.progress import Progress

    from aqexport.calibration_run import run_calibration
    from aqexport.config import load_config

    cfg = load_config(config)
    with Progress(transient=True) as progress:
        task = progress.add_task("calibrating blocks", total=None)
        report = run_calibration(
            cfg, config.parent.resolve(), lambda done, total: progress.update(task, completed=done, total=total)
        )
    if report is None:  # a torchrun rank other than 0: rank 0 writes and reports
        return
    click.echo(f"plan: {report['plan_dir']}  ({report['calibration_seconds']:.0f} s)")
    ev = report["evaluation"]
    if ev:
        click.echo(
            f"perplexity fp {ev['fp_perplexity']:.4f}  fake-quant {ev['fake_quant_perplexity']:.4f}  "
            f"ratio {ev['ratio']:.3f}  ({ev['windows']}x{ev['seqlen']})"
        )


@cli.command()
@click.argument("artifact")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--sample/--greedy", default=False, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--provider", "providers", multiple=True, type=PROVIDERS, default=("cpu",), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print tokens, text and timings as JSON.")
@_no_verify_option
def run(artifact, prompt, max_new_tokens, sample, temperature, top_k, top_p, seed, chat, providers, as_json, no_verify):
    """Generate text with the artifact in ARTIFACT."""
    from aqexport.runtime import create_session, decoder_for, generate, prefill_session
    from aqexport.runtime.generate import SamplingConfig
    from aqexport.runtime.session import genai_facts

    directory = _artifact_dir(artifact)
    _verify(directory, no_verify)
    tokenizer = _load_tokenizer(directory)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise AqexportError(f"the tokenizer in '{directory}' has no chat template", "drop --chat")
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        tokens = list(encoded["input_ids"])
    else:
        tokens = tokenizer(prompt)["input_ids"]
    session, info = create_session(directory, providers)
    decoder = decoder_for(session, *genai_facts(directory), prefill=prefill_session(directory, providers))
    _check_prompt_fits(len(tokens), max_new_tokens, _context_length(directory, decoder))
    eos = tokenizer.eos_token_id
    result = generate(
        decoder,
        tokens,
        max_new_tokens,
        eos_token_ids=frozenset({eos}) if eos is not None else frozenset(),
        sampling=SamplingConfig(sample, temperature, top_k, top_p, seed),
    )
    text = tokenizer.decode(result.new_tokens, skip_special_tokens=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "text": text,
                    "tokens": result.new_tokens,
                    "providers": info.used,
                    "prefill_tokens_per_second": result.prefill_tokens_per_second,
                    "decode_tokens_per_second": result.decode_tokens_per_second,
                }
            )
        )
        return
    click.echo(prompt + text if not chat else text)
    click.echo(
        f"[{len(result.new_tokens)} tokens; prefill {result.prefill_tokens_per_second:.1f} tok/s, "
        f"decode {result.decode_tokens_per_second:.1f} tok/s; providers {', '.join(info.used)}]",
        err=True,
    )


def _context_length(directory: Path, decoder) -> int | None:
    """Positions the artifact can attend over: a static (npu) graph's cache slots, else the
    ``context_length`` of ``genai_config.json`` (the model's ``max_position_embeddings``: rotary
    caches end there), else ``config.json``'s; ``None`` when nothing says."""
    if getattr(decoder, "context", None):
        return int(decoder.context)
    for name, keys in (
        ("genai_config.json", ("model", "context_length")),
        ("config.json", ("max_position_embeddings",)),
    ):
        try:
            value = json.loads((directory / name).read_text())
            for key in keys:
                value = value[key]
            return int(value)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _check_prompt_fits(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """Refuse a generation that cannot fit the context before running it: past the context a
    rotary cache is indexed out of range (or a static cache overflows) mid-generation. The last
    new token is never fed back, so prompt + new - 1 positions are used."""
    if prompt_tokens == 0:
        raise ConfigError("the prompt is empty (0 tokens)", "pass some text with --prompt")
    if context is None:
        return
    if prompt_tokens > context:
        raise ConfigError(
            f"the prompt is {prompt_tokens} tokens, longer than the artifact's context of {context} tokens",
            f"shorten the prompt to at most {context} tokens",
        )
    if prompt_tokens + max_new_tokens - 1 > context:
        raise ConfigError(
            f"the prompt's {prompt_tokens} tokens plus --max-new-tokens {max_new_tokens} exceed the artifact's "
            f"context of {context} tokens",
            f"lower --max-new-tokens to at most {context - prompt_tokens + 1}, or shorten the prompt",
        )


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers") from None
    if not lengths or min(lengths) < 1:
        raise click.BadParameter("give at least one positive length")
    return lengths


@cli.command()
@click.argument("artifact")
@click.option("--prefill", default="128,512,2048", show_default=True, callback=_int_list, help="Prefill lengths.")
@click.option("--decode-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--decode-context", default=128, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0))
@click.option("--threads", default=None, type=click.IntRange(1), help="ONNX Runtime intra-op threads.")
@click.option("--provider", "providers", multiple=True, type=PROVIDERS, default=("cpu",), show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_no_verify_option
def bench(artifact, prefill, decode_tokens, decode_context, repeats, warmup, threads, providers, as_json, no_verify):
    """Measure prefill / decode throughput, time to first token and peak RSS of ARTIFACT."""
    import time

    from aqexport.runtime import create_session
    from aqexport.runtime.bench import bench_session, current_rss_mib
    from aqexport.runtime.session import genai_facts

    directory = _artifact_dir(artifact)
    _verify(directory, no_verify)
    config_file = directory / "config.json"
    vocab = json.loads(config_file.read_text()).get("vocab_size") if config_file.is_file() else None
    head_dim, kv_cache = genai_facts(directory)
    rss = current_rss_mib()
    start = time.perf_counter()
    session, info = create_session(directory, providers, intra_op_threads=threads)
    loaded = time.perf_counter() - start
    result = bench_session(
        session, prefill, decode_tokens, decode_context, repeats, warmup, 0, vocab, rss, loaded, head_dim, kv_cache
    )
    data = {"artifact": str(directory), "providers": info.used, "threads": threads, **result.as_dict()}
    if as_json:
        click.echo(json.dumps(data))
        return
    for length, spread in result.prefill_tokens_per_second.items():
        click.echo(f"prefill {length:>5}: {spread.median:9.1f} tok/s  (min {spread.min:.1f}, max {spread.max:.1f})")
    ttft, decode = result.time_to_first_token_ms, result.decode_tokens_per_second
    click.echo(f"first token ({prefill[0]} prompt): {ttft.median:.1f} ms  (min {ttft.min:.1f}, max {ttft.max:.1f})")
    click.echo(
        f"decode ({decode_tokens} after {decode_context}): {decode.median:.1f} tok/s  "
        f"(min {decode.min:.1f}, max {decode.max:.1f})"
    )
    click.echo(f"peak RSS {result.peak_rss_mib:.0f} MiB (before session {rss:.0f} MiB); session {loaded:.1f} s")


@cli.command(name="eval")
@click.argument("artifact")
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--seqlen", default=512, show_default=True, type=click.IntRange(8))
@click.option("--max-windows", default=None, type=click.IntRange(1), help="Score only the first K windows.")
@click.option("--provider", "providers", multiple=True, type=PROVIDERS, default=("cpu",), show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_no_verify_option
def eval_command(artifact, text_file, seqlen, max_windows, providers, as_json, no_verify):
    """Perplexity of ARTIFACT on a text file (non-overlapping windows, ALGORITHMS.md §7)."""
    from tqdm import tqdm

    from aqexport.runtime import create_session, decoder_for, perplexity, prefill_session
    from aqexport.runtime.perplexity import onnx_logits_of
    from aqexport.runtime.session import genai_facts
    from aqexport.verify import text_windows

    directory = _artifact_dir(artifact)
    _verify(directory, no_verify)
    tokenizer = _load_tokenizer(directory)
    windows = text_windows(tokenizer, text_file, seqlen, max_windows, ("--text", "--seqlen"))
    session, info = create_session(directory, providers)
    decoder = decoder_for(session, *genai_facts(directory), prefill=prefill_session(directory, providers))
    result = perplexity(onnx_logits_of(decoder), windows, lambda it: tqdm(it, desc="windows", disable=as_json))
    payload = {**result.as_dict(), "text": str(text_file), "providers": info.used, "tokenizer": tokenizer.name_or_path}
    if as_json:
        click.echo(json.dumps(payload))
    else:
        click.echo(
            f"perplexity {result.perplexity:.4f} over {result.windows} windows of {seqlen} tokens "
            f"({result.tokens} predicted tokens)"
        )


@cli.command()
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True)
def inspect(artifact, as_json):
    """Op histogram, sizes, I/O and quantization summary of ARTIFACT."""
    from aqexport.inspect_artifact import inspect_artifact

    summary = inspect_artifact(Path(artifact))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"{summary['model']}: {summary['nodes']} nodes, {summary['initializers']} initializers, "
        f"{summary['total_bytes'] / 2**20:.1f} MiB on disk; opsets {summary['opset']}"
    )
    click.echo(
        "inputs:  "
        + ", ".join(f"{i['name']}{i['shape']}" for i in summary["inputs"][:5])
        + (" ..." if len(summary["inputs"]) > 5 else "")
    )
    click.echo(
        "outputs: "
        + ", ".join(f"{o['name']}{o['shape']}" for o in summary["outputs"][:3])
        + (" ..." if len(summary["outputs"]) > 3 else "")
    )
    click.echo("ops:")
    for op, count in summary["ops"].items():
        click.echo(f"  {op:32s} {count}")
    click.echo(f"weights by dtype: {summary['weight_bytes_by_dtype']}")
    click.echo(f"quantization: {summary['quantization']}")
    if summary.get("transforms"):
        cost = summary["transforms"]
        click.echo(
            f"norm-side transforms at run time: {cost['transforms']} explicit, {cost['flops_per_token']} FLOPs and "
            f"{cost['bytes_per_token']} float32 bytes per token; forms {cost['forms']}"
        )


@cli.command("verify")
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="The report as JSON (also when the check fails).")
def verify_command(artifact: Path, as_json: bool) -> None:
    """Check every file of ARTIFACT against the sha256 and size in its manifest.json.

    Exit status: 0 intact (or no manifest.json to check against, with a note), 2 a file changed,
    is missing, or is loaded by the runtime but not listed.
    """
    from aqexport.integrity import check_artifact, verify_artifact

    if as_json and Path(artifact).is_dir():
        report = verify_artifact(artifact)
        click.echo(json.dumps(report.as_dict(), indent=2))
        if not report.ok:
            sys.exit(ConfigError.exit_code)
        return
    report = check_artifact(artifact)
    click.echo(report.summary(), err=not report.has_manifest)


@cli.command("report")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--regenerate",
    is_flag=True,
    help="Render report.html again from the artifact's files and record it in manifest.json.",
)
@click.option("--open", "open_page", is_flag=True, help="Open report.html in the default web browser.")
def report_command(artifact: Path, regenerate: bool, open_page: bool) -> None:
    """Print the path of ARTIFACT's report.html: one self-contained page with the build's stages,
    parity ladder, perplexity and greedy checks, calibration, transforms, graph and sizes.

    --regenerate renders it again (after checking the other files against the manifest) and
    records its new sha256 in manifest.json, so 'aqexport verify' still passes."""
    from aqexport.integrity import check_artifact
    from aqexport.report_html import REPORT_FILE, regenerate_report

    try:
        directory = _artifact_dir(str(artifact))
    except AqexportError as exc:  # bad input: exit status 2
        raise ConfigError(exc.cause, exc.fix) from None
    path = directory / REPORT_FILE
    if regenerate:
        check_artifact(
            directory, "rebuild it, or copy it again: --regenerate renders only an intact artifact", (REPORT_FILE,)
        )
        path = regenerate_report(directory)
    elif not path.is_file():
        raise ConfigError(
            f"'{directory}' has no {REPORT_FILE} (an older aqexport built it)",
            f"run 'aqexport report {directory} --regenerate'",
        )
    click.echo(str(path))
    if open_page:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            click.echo("note: no web browser found to open it; open the path above", err=True)


@cli.command("diff")
@click.argument("a")
@click.argument("b", required=False)
@click.option("--run", "run_models", is_flag=True, help="Run both on the same inputs: first divergent tensor, logits.")
@click.option(
    "--text", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="Perplexity text (implies --run)."
)
@click.option("--windows", type=click.IntRange(1), default=4, show_default=True, help="Perplexity windows of --text.")
@click.option("--seqlen", type=click.IntRange(8), default=256, show_default=True)
@click.option("--threshold-db", type=float, default=20.0, show_default=True, help="SQNR below which a tensor diverges.")
@click.option("--provider", type=PROVIDERS, default="cpu", show_default=True)
@click.option(
    "--policy", "policy_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="Gate YAML."
)
@click.option("--max-ppl-increase", type=float, help="Relative, e.g. 0.01 for +1 %.")
@click.option("--min-top1-agreement", type=float)
@click.option("--min-weight-sqnr-db", type=float)
@click.option("--max-size-increase", type=float, help="Relative, e.g. 0.05 for +5 %.")
@click.option("--forbid-op", "forbid_ops", multiple=True, help="Op (or domain::op) that B must not contain.")
@click.option("--allow-new-op", "allow_new_ops", multiple=True, help="Op B may add; any other new op fails.")
@click.option("--max-changed-linears", type=click.IntRange(0))
@click.option("--io-must-match", is_flag=True)
@click.option("--structure-must-match", is_flag=True, help="Pin the graph, let weight bytes move (golden checks).")
@click.option("--require-identical", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="The versioned JSON report (docs/diff-schema.md).")
@click.option("--markdown", "as_markdown", is_flag=True, help="A pull-request comment.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the report here.")
@click.option("--describe", is_flag=True, help="Write A's golden description (structure and hashes, no weights).")
@click.option("--no-verify", is_flag=True, help="Skip checking artifact directories against their manifest.")
def diff_command(
    a,
    b,
    run_models,
    text,
    windows,
    seqlen,
    threshold_db,
    provider,
    policy_file,
    as_json,
    as_markdown,
    output,
    describe,
    no_verify,
    **policy_flags,
) -> None:
    """Compare artifact A with B (directories, .onnx files or golden descriptions) and gate on a policy.

    Exit status: 0 no policy or it passed, 1 the policy was violated, 2 bad input.
    """
    from aqexport.diff.command import DiffRequest, describe_to, run_diff

    if describe:
        try:
            describe_to(a, output)
        except AqexportError as exc:
            raise ConfigError(exc.cause, exc.fix) from None
        return
    if b is None:
        raise AqexportError("diff needs two sides, A and B", "pass two artifacts, or --describe to describe one")
    if as_json and as_markdown:
        raise AqexportError("--json and --markdown are exclusive", "pick one output format")
    if policy_flags.get("allow_new_ops") == ():
        policy_flags["allow_new_ops"] = None
    request = DiffRequest(
        a=a,
        b=b,
        run=run_models,
        text=text,
        windows=windows,
        seqlen=seqlen,
        threshold_db=threshold_db,
        provider=provider,
        policy_file=policy_file,
        policy_flags={k: (list(v) if isinstance(v, tuple) else v) for k, v in policy_flags.items()},
        output_format="json" if as_json else "markdown" if as_markdown else "terminal",
        output=output,
        verify=not no_verify,
    )
    try:
        status = run_diff(request)
    except AqexportError as exc:  # exit status 1 means "policy violated": every failure here is 2
        raise ConfigError(exc.cause, exc.fix) from None
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except AqexportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
