"""``report.html`` (issue 18): every build writes one self-contained page, listed in the manifest;
``aqexport report`` prints, regenerates or opens it.

One tiny calibrated build (AffineQuant on the 2-layer Llama, with the parity ladder) serves the
module: headless Chromium loads its page and must request nothing but the page and its own
``data:`` images, fail nothing, log nothing and show every section; a regenerated page (in
another process) is the same bytes; the rest renders pages from made-up records with sections
missing, which must say so instead of failing.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import webbrowser
from pathlib import Path

import pytest

from aqexport.cli import main
from aqexport.integrity import verify_artifact
from aqexport.report_html import REPORT_FILE, ArtifactFacts, read_facts, render_report
from aqexport.report_markup import NOT_RECORDED
from aqexport.report_sections import SECTIONS
from tests.conftest import tiny_build_config
from tests.headless_chromium import CHROMIUM, load_page
from tests.test_bad_input import refused, run_cli
from tests.tiny_models import data_file

SECTION_IDS = [section_id for section_id, _, _ in SECTIONS]
QUANTIZATION = {"recipe": "affinequant", "preset": "w4a16g128"}
CALIBRATION = {"data": str(data_file("valid")), "samples": 2, "seqlen": 32, "epochs": 2}
#: src/href/url() naming anything but a fragment of the page or a data: URI
EXTERNAL = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?)(?!#|data:)[^"'\s>)]""", re.IGNORECASE)


@pytest.fixture(scope="module")
def work(tiny_model_dir, tmp_path_factory) -> Path:
    """A work folder holding ``model.yaml``, ``artifact/`` and ``artifact.plan/`` (read only)."""
    from aqexport.config import load_config
    from aqexport.pipeline import build

    folder = tmp_path_factory.mktemp("report")
    config = tiny_build_config(folder, tiny_model_dir("llama"), quantization=QUANTIZATION, calibration=CALIBRATION)
    build(load_config(config), folder)
    return folder


@pytest.fixture
def copy(work, tmp_path) -> Path:
    """A copy of the work folder this test may change; returns its artifact."""
    shutil.copytree(work, tmp_path / "work")
    return tmp_path / "work" / "artifact"


def _sections(page: str) -> dict[str, str]:
    """Section id -> its markup."""
    found = re.findall(r'<section id="([^"]+)">(.*?)</section>', page, re.DOTALL)
    return dict(found)


def main_status(args: list[str]) -> int:
    """``aqexport ARGS`` in this process: its exit status (its output stays in capsys)."""
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_build_writes_the_page_and_lists_it_as_not_reproducible(work):
    artifact = work / "artifact"
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert REPORT_FILE in manifest["files"]
    assert manifest["not_reproducible"]["files"] == ["report.json", REPORT_FILE]
    assert verify_artifact(artifact).ok
    memory = json.loads((artifact / "report.json").read_text())["memory"]["peak_rss_mib"]
    assert list(memory)[:6] == ["load", "capture", "calibrate", "lower", "write", "verify"]
    assert all(value > 0 for value in memory.values())


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_page_loads_in_headless_chromium_with_every_section(work):
    page = load_page(work / "artifact" / REPORT_FILE)
    external = [url for url in page.requests if not url.startswith("data:")]
    assert external == [(work / "artifact" / REPORT_FILE).resolve().as_uri()]
    assert page.failed == [] and page.messages == [] and page.exceptions == []
    assert list(page.sections) == SECTION_IDS
    assert len(page.images) == 3 and all(loaded and width > 0 for loaded, width in page.images)
    text = page.sections
    assert "could not be rendered" not in "".join(text.values())
    assert "peak RSS" in text["stages"] and "verify" in text["stages"]
    assert "folded float graph vs exported float graph" in text["parity-ladder"]
    assert "artifact (ONNX Runtime)" in text["checks"] and "Greedy text" in text["checks"]
    assert "affinequant" in text["calibration"]
    assert "min dominance margin" in text["transforms"]
    assert "model.layers.1.mlp.down_proj" in text["linears"] and "median plan / RTN" in text["linears"]
    assert "com.microsoft::MatMulNBits" in text["graph"]
    assert "UINT8" in text["sizes"]
    assert "not a mobile build" in text["mobile"]


def test_page_is_self_contained_and_escaped(work):
    page = (work / "artifact" / REPORT_FILE).read_text()
    assert EXTERNAL.findall(page) == []
    assert "<script" not in page.lower()
    assert "default-src 'none'" in page  # the browser loads nothing else even if asked to
    greedy = json.loads((work / "artifact" / "report.json").read_text())["verification"]["greedy"]["text"]
    sections = _sections(page)
    assert list(sections) == SECTION_IDS
    assert NOT_RECORDED not in sections["calibration"] + sections["parity-ladder"] + sections["stages"]
    assert f"<pre>{html.escape(greedy)}</pre>" in sections["checks"]


def test_regenerate_in_another_process_writes_the_same_bytes(copy):
    built = (copy / REPORT_FILE).read_bytes()
    manifest = (copy / "manifest.json").read_bytes()
    (copy / REPORT_FILE).write_text("<p>edited</p>")
    assert not verify_artifact(copy).ok
    done = subprocess.run(
        [sys.executable, "-m", "aqexport.cli", "report", str(copy), "--regenerate"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(copy / REPORT_FILE)
    assert (copy / REPORT_FILE).read_bytes() == built  # deterministic plots, same plan, same records
    assert (copy / "manifest.json").read_bytes() == manifest
    assert verify_artifact(copy).ok


def test_regenerate_records_a_new_page_and_refuses_a_changed_artifact(copy, capsys):
    shutil.rmtree(copy.with_name("artifact.plan"))  # the plan moved away: the page says so
    assert run_cli(capsys, "report", copy, "--regenerate")[0] == 0
    page = (copy / REPORT_FILE).read_text()
    assert "plan directory &#x27;artifact.plan&#x27; not found beside the artifact" in page
    assert run_cli(capsys, "verify", copy)[0] == 0
    (copy / "genai_config.json").write_text("{}")
    line = refused(*run_cli(capsys, "report", copy, "--regenerate"), "genai_config.json changed")
    assert "--regenerate renders only an intact artifact" in line


def test_report_prints_and_opens_the_page(work, capsys, monkeypatch):
    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda uri: opened.append(uri) or True)
    assert main_status(["report", str(work / "artifact"), "--open"]) == 0
    assert capsys.readouterr().out.strip() == str(work / "artifact" / REPORT_FILE)
    assert opened == [(work / "artifact" / REPORT_FILE).resolve().as_uri()]


def test_report_refuses_what_is_not_an_artifact(tmp_path, capsys):
    refused(*run_cli(capsys, "report", tmp_path / "nowhere"), "is not an artifact directory")
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "model.onnx").write_bytes(b"")
    line = refused(*run_cli(capsys, "report", tmp_path / "older"), "has no report.html")
    assert "--regenerate" in line


# ------------------------------------------------------------------------------------------------
# pages of made-up records


def _page(report: dict | None, manifest: dict | None = None, tmp: Path | None = None) -> dict[str, str]:
    if tmp is not None:  # from files, as the CLI reads them
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report))
        if manifest is not None:
            (tmp / "manifest.json").write_text(json.dumps(manifest))
        facts = read_facts(tmp)
    else:
        facts = ArtifactFacts(report or {}, manifest or {}, None, None, {"graph": "no model.onnx in the artifact"})
    page = render_report(facts)
    assert EXTERNAL.findall(page) == []
    sections = _sections(page)
    assert list(sections) == SECTION_IDS
    assert "could not be rendered" not in page
    return sections


def test_page_of_an_empty_directory_says_what_is_missing(tmp_path):
    sections = _page(None, tmp=tmp_path)
    for section_id in SECTION_IDS:
        if section_id not in ("summary", "mobile"):
            assert NOT_RECORDED in sections[section_id], section_id
    assert "no report.json in the artifact" in sections["summary"]
    assert "not a mobile build" in sections["mobile"]


def test_page_of_a_float_build_without_optional_sections():
    report = {
        "timings": {"load": 1.0, "capture": 2.5, "lower": 0.5},
        "verification": {"skipped": "target.profile cuda: no CUDA execution provider"},
        "model_bytes": 2048,
        "model_files": {"model.onnx": 1024, "model.onnx.data": 1024},
        "quantization": {"recipe": "none", "weight_format": None},
    }
    sections = _page(report, {"source": {"kind": "hub", "location": "org/<model>"}})
    assert "peak memory: " + NOT_RECORDED in sections["stages"]
    assert "verification skipped: target.profile cuda" in sections["parity-ladder"]
    assert "calibration (this build&#x27;s recipe does not calibrate)" in sections["calibration"]
    assert "org/&lt;model&gt;" in sections["summary"]  # escaped, never markup


def test_page_of_a_mobile_build_shows_each_verdict():
    ep = {"nodes": 10, "supported_nodes": 9, "fraction": 0.9, "partitions": 2, "unsupported_ops": ["Foo"]}
    report = {
        "mobile": {
            "contract": "static step graph",
            "genai": "not written",
            "execution_providers": {
                "nnapi": {**ep, "verdict": "PARTIAL"},
                "coreml_mlprogram": {**ep, "verdict": "FULL"},
                "xnnpack": {"available": False, "installed_providers": ["CPUExecutionProvider"]},
            },
        },
        "verification": {
            "ort_format": {"bytes": 5, "loads_on": ["CPUExecutionProvider"], "xnnpack": {"skipped": "n/a"}}
        },
    }
    sections = _page(report)
    assert "nnapi" in sections["mobile"] and "PARTIAL" in sections["mobile"] and "Foo" in sections["mobile"]
    assert "XNNPACK: not offered" in sections["mobile"]
    assert "model.ort" in sections["checks"]


def test_page_of_a_cpu_ep_mobile_build_lists_its_operator_config():
    report = {
        "mobile": {
            "contract": "the cpu profile's graph, sized for 2048 positions",
            "accuracy_level": 4,
            "ort_format": "model.ort: Fixed style",
            "operator_config": {
                "file": "required_operators_and_types.config",
                "operators": ["com.microsoft:MatMulNBits", "ai.onnx:Add"],
            },
            "reduced_build": "not built here",
        }
    }
    section = _page(report)["mobile"]
    assert "required_operators_and_types.config: 2 operators" in section
    assert "com.microsoft:MatMulNBits" in section and "reduced build: not built here" in section
    assert NOT_RECORDED not in section


def test_records_of_unexpected_shape_do_not_fail_the_page():
    report = {
        "timings": "soon",
        "calibration": {"blocks": {"0": {"output_mse": None}}, "recipe": None},
        "parity_ladder": {"exported_fp_vs_eager": "skipped: too large"},
        "verification": {"greedy": {"text": "a\x00b <b>"}, "perplexity": {"onnx": None}},
        "transforms": {"per_transform": {"x": None}},
    }
    sections = _page(report, {"quantization": {"linears": {"a.b": {"weight": None}}}, "passes": [{}]})
    assert "a\\x00b &lt;b&gt;" in sections["checks"]
    assert "skipped: too large" in sections["parity-ladder"]
