"""The gate in a CI (issue 54): JUnit output, regression against a released model's report, the
verdict first in report.md, and the example workflows run as their users would run them."""

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from rcomp.cli import cli
from rcomp.errors import RcompError
from rcomp.export.baseline import Tolerance, parse_max_regression
from rcomp.export.check import make_attack_set
from rcomp.export.runtime import make_session, predict
from rcomp.export.square import square_attack

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ci"
EPS = 8 / 255
SHAPE = (1, 1, 8, 8)
PROFILE = {"name": "ci-test", "description": "8x8 prototypes", "input_shape": list(SHAPE), "opset": 17,
           "target": {"runtime": "onnxruntime", "execution_provider": "CPUExecutionProvider", "threads": 1,
                      "graph_optimization": "all"},
           "budgets": {"mops": 1.0, "latency_p90_ms": 1000.0},
           "robustness": {"eps": "8/255", "min_clean_acc": 0.5, "min_adv_acc": 0.0}}


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def widened(model: nn.Sequential, extra: int) -> nn.Sequential:
    """The same function with ``extra`` more hidden units whose outgoing weights are zero: a model
    'pruned less' (more MOps, identical logits, so every accuracy is equal)."""
    first, last = model[1], model[3]
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 64 + extra), nn.ReLU(), nn.Linear(64 + extra, 10))
    with torch.no_grad():
        wide[1].weight[:64], wide[1].bias[:64] = first.weight, first.bias
        wide[3].weight.zero_()
        wide[3].weight[:, :64], wide[3].bias[:] = last.weight, last.bias
    return wide


@pytest.fixture(scope="module")
def gate(trained, tmp_path_factory):
    """Released and candidate folders (model.onnx + adv.npz) the way rcomp prune leaves them, and a profile."""
    from rcomp.export.onnx_export import export_onnx

    model, x, y = trained
    model = model.eval()
    d = tmp_path_factory.mktemp("gate")
    (d / "profile.yaml").write_text(yaml.safe_dump(PROFILE))
    x, y = x[:48].numpy(), y[:48].numpy()
    rng = np.random.default_rng(0)
    weak = np.clip(x + np.float32(0.2 * EPS) * rng.choice([-1, 1], size=x.shape).astype(np.float32), 0, 1)
    for name, net in (("released", model), ("same", model), ("wider", widened(model, 64))):
        (d / name).mkdir()
        export_onnx(net.eval(), SHAPE, d / name / "model.onnx", opset=17, metadata={}, check_n=1)
        make_attack_set(d / name / "adv.npz", x, y, weak, EPS, "noise")
    sess = make_session(d / "released" / "model.onnx", threads=1, graph_optimization="all")
    strong = square_attack(lambda z: predict(sess, z), x, y, eps=EPS, n_queries=300, seed=1).x_adv
    (d / "harder").mkdir()
    shutil.copy(d / "released" / "model.onnx", d / "harder" / "model.onnx")
    make_attack_set(d / "harder" / "adv.npz", x, y, strong, EPS, "square-300")
    code, out = run("check", d / "released" / "model.onnx", "--profile", d / "profile.yaml", "--attack-set",
                    d / "released" / "adv.npz", "--report-dir", d / "released", "--latency-runs", 20)
    assert code == 0, out
    return d


def check(gate, name, out, *extra):
    return run("check", gate / name / "model.onnx", "--profile", gate / "profile.yaml", "--attack-set",
               gate / name / "adv.npz", "--report-dir", out, "--junit", out / "junit.xml", "--latency-runs", 20, *extra)


def junit(path):
    """Parse and check the structure CI test reporters read; returns {testcase name: element}."""
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert suites and all(s.get("name") for s in suites)
    cases = {}
    for attr in ("tests", "failures", "errors", "skipped"):
        assert int(root.get(attr)) == sum(int(s.get(attr)) for s in suites), attr
    for s in suites:
        float(s.get("time"))
        kids = s.findall("testcase")
        assert int(s.get("tests")) == len(kids)
        assert int(s.get("failures")) == sum(1 for c in kids if c.find("failure") is not None)
        assert int(s.get("skipped")) == sum(1 for c in kids if c.find("skipped") is not None)
        assert int(s.get("errors")) == 0
        for c in kids:
            assert c.get("name") and c.get("classname", "").startswith("rcomp.check.ci-test.")
            assert float(c.get("time")) >= 0
            failure = c.find("failure")
            if failure is not None:
                assert failure.get("message") and failure.get("type") and failure.text
            cases[c.get("name")] = c
    return cases


def test_junit_has_one_case_per_check_with_value_limit_and_detail(gate, tmp_path):
    tight = dict(PROFILE, budgets={"mops": 0.001, "latency_p90_ms": 1000.0})
    (tmp_path / "tight.yaml").write_text(yaml.safe_dump(tight))
    code, out = run("check", gate / "released" / "model.onnx", "--profile", tmp_path / "tight.yaml", "--attack-set",
                    gate / "released" / "adv.npz", "--report-dir", tmp_path, "--junit", tmp_path / "ci" / "junit.xml",
                    "--latency-runs", 5)
    assert code == 1, out
    cases = junit(tmp_path / "ci" / "junit.xml")
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(cases) >= {r["name"] for r in report["rows"]} | {s["name"] for s in report["sanity"]}
    failure = cases["mops"].find("failure")
    assert failure.get("type") == "BudgetExceeded"
    assert failure.get("message").startswith("mops: 0.004736 MOps, limit <= 0.001 MOps")  # 64x64 + 64x10 MACs
    assert cases["clean_acc"].find("failure") is None and "limit: 0.5" in cases["clean_acc"].find("system-out").text
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[0] == "# rcomp check: FAIL" and md[4].startswith("- **mops**: 0.004736 MOps, limit <= 0.001")


def test_the_same_model_against_itself_passes(gate, tmp_path):
    code, out = check(gate, "same", tmp_path, "--baseline", gate / "released" / "report.json",
                      "--max-regression", "adv_acc=0.01,clean_acc=0,mops=0,params=0")
    assert code == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and [r["status"] for r in report["regression"]["rows"]] == ["pass"] * 4
    assert {f"{n} vs baseline" for n in ("adv_acc", "clean_acc", "mops", "params")} <= set(junit(tmp_path / "junit.xml"))
    assert (tmp_path / "report.md").read_text().startswith("# rcomp check: PASS\n")


@pytest.mark.parametrize("candidate, extra, figure", [
    ("wider", [], "mops"),                                  # pruned less: twice the hidden units
    ("harder", [], "adv_acc"),                              # a stronger shipped attack set
    ("same", ["--square-queries", "300"], "adv_acc"),       # a stronger attack by the gate
])
def test_a_regression_fails_and_is_named_everywhere(gate, tmp_path, candidate, extra, figure):
    code, out = check(gate, candidate, tmp_path, "--baseline", gate / "released" / "report.json",
                      "--max-regression", "adv_acc=0.01,mops=0", *extra)
    assert code == 1, out
    assert f"FAILED {figure} vs baseline" in out
    report = json.loads((tmp_path / "report.json").read_text())
    row = next(r for r in report["regression"]["rows"] if r["name"] == figure)
    assert row["status"] == "fail" and not report["passed"]
    assert any(line.startswith(f"{figure} vs baseline") for line in report["failing"])
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# rcomp check: FAIL") and f"- **{figure} vs baseline**" in md.split("|")[0]
    failure = junit(tmp_path / "junit.xml")[f"{figure} vs baseline"].find("failure")
    assert failure.get("type") == "Regression" and "baseline" in failure.get("message")


def _edited_baseline(gate, tmp_path, edit):
    doc = json.loads((gate / "released" / "report.json").read_text())
    edit(doc)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["context"].update(profile="jetson"), "profile 'jetson'"),
    (lambda d: d["context"].update(input_shape=[1, 3, 32, 32]), "input shape [1, 3, 32, 32]"),
    (lambda d: d["context"]["attack_set"].update(images_sha256="0" * 64), "other images"),
    (lambda d: d["context"].update(eps=4 / 255), "eps"),
    (lambda d: d.pop("context"), "'context' section"),
])
def test_a_baseline_measured_under_other_conditions_is_refused(gate, tmp_path, edit, message):
    code, out = check(gate, "same", tmp_path, "--baseline", _edited_baseline(gate, tmp_path, edit))
    assert code == 2 and message in out, out
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "junit.xml").exists()


def test_latency_from_another_host_is_skipped_and_said(gate, tmp_path):
    def elsewhere(d):
        d["context"]["host"]["cpu_model"] = "Cortex-A78AE"
        d["latency"]["model"]["p90_ms"] = 1e-6  # would fail any comparison
    code, out = check(gate, "same", tmp_path, "--baseline", _edited_baseline(gate, tmp_path, elsewhere),
                      "--max-regression", "latency_p90_ms=5%,mops=0")
    assert code == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["name"]: r for r in report["regression"]["rows"]}
    assert rows["latency_p90_ms"]["status"] == "skipped" and "another host" in rows["latency_p90_ms"]["detail"]
    assert any("another host" in f and "Cortex-A78AE" in f for f in report["flags"])
    assert junit(tmp_path / "junit.xml")["latency_p90_ms vs baseline"].find("skipped") is not None


def test_latency_on_the_same_host_is_compared_relative(gate, tmp_path):
    code, out = check(gate, "same", tmp_path, "--baseline",
                      _edited_baseline(gate, tmp_path, lambda d: d["latency"]["model"].update(p90_ms=1e-6)),
                      "--max-regression", "latency_p90_ms=5%")
    assert code == 1 and "FAILED latency_p90_ms vs baseline" in out, out


def test_max_regression_parsing():
    assert parse_max_regression("adv_acc=0.01, latency_p90_ms=5%,mops=0") == {
        "adv_acc": Tolerance(0.01, False), "latency_p90_ms": Tolerance(5.0, True), "mops": Tolerance(0.0, False)}
    assert Tolerance(5.0, True).allowed(2.0) == pytest.approx(0.1)
    for bad in ("adv=0.1", "mops", "mops=-1", "mops=nan", "mops=1,mops=2", "mops=x%"):
        with pytest.raises(RcompError):
            parse_max_regression(bad)


def test_max_regression_without_a_baseline_is_bad_input(gate, tmp_path):
    code, out = check(gate, "same", tmp_path, "--max-regression", "mops=0")
    assert code == 2 and "--baseline" in out


# ------------------------------------------------------------------------------------------------
# examples/ci: the YAML parsed, the check step's commands run as written
# ------------------------------------------------------------------------------------------------


def _github_job():
    doc = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    (job,) = doc["jobs"].values()
    step = next(s for s in job["steps"] if "rcomp check" in s.get("run", ""))
    install = next(s for s in job["steps"] if "pip install" in s.get("run", ""))
    assert any(s.get("uses", "").startswith("mikepenz/action-junit-report") and s.get("if") == "always()"
               for s in job["steps"])
    return job["env"], step["run"].splitlines(), install["run"].splitlines()


def _gitlab_job():
    (job,) = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text()).values()
    assert job["artifacts"]["reports"]["junit"] == "gate/junit.xml" and job["artifacts"]["when"] == "always"
    return job["variables"], job["script"], job["before_script"]


@pytest.mark.parametrize("load", [_github_job, _gitlab_job], ids=["github", "gitlab"])
def test_the_example_ci_jobs_run_and_fail_on_a_regression(gate, tmp_path, load):
    env, commands, install = load()
    assert env["GATE_DIR"] == "gate" and "adv_acc=" in env["MAX_REGRESSION"]
    repo = Path(__file__).resolve().parents[1]
    # The install step's requirement list is the runtime extra, and it has no torch in it.
    listing = subprocess.run(["bash", "-c", install[0].replace("> runtime.txt", "")], cwd=repo, capture_output=True,
                             text=True, check=True).stdout.split()
    assert "onnxruntime>=1.17" in listing and not any(r.startswith("torch") for r in listing)
    assert [c.strip() for c in install[1:]] == ["pip install -r runtime.txt", "pip install --no-deps ."]
    script = "set -e\n" + "\n".join(commands)
    for candidate, expected in (("same", 0), ("wider", 1)):
        work = tmp_path / candidate
        work.mkdir()
        shutil.copytree(gate / "released", work / "models" / "released")
        shutil.copytree(gate / candidate, work / "models" / "candidate")
        shutil.copy(gate / "profile.yaml", work / "profile.yaml")
        run_env = {**os.environ, **{k: str(v) for k, v in env.items()}, "PROFILE": "profile.yaml",
                   # latency of a 20 µs MLP on this shared test machine jitters beyond any tolerance
                   "MAX_REGRESSION": "adv_acc=0.01,clean_acc=0.01,mops=0,params=0"}
        proc = subprocess.run(["bash", "-c", script], cwd=work, env=run_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == expected, proc.stdout + proc.stderr
        cases = junit(work / "gate" / "junit.xml")
        assert (cases["mops vs baseline"].find("failure") is not None) == (expected == 1)
        assert (work / "gate" / "report.md").read_text().startswith("# rcomp check: " + ("PASS" if expected == 0 else "FAIL"))
