"""The check as a JUnit XML file, so a CI's test view shows each budget, floor and regression.

One ``<testcase>`` per check, grouped into one ``<testsuite>`` per kind (integrity, budgets,
robustness, sanity, regression) under ``<testsuites>``: the shape GitLab (``artifacts:reports:junit``),
Jenkins (``junit``), Azure Pipelines (``PublishTestResults``, JUnit format) and the GitHub test
reporters read. A failed or unevaluated check is a ``<failure>`` whose ``message`` carries the
value, the limit and the detail; a regression skipped because the baseline ran on another host
is ``<skipped>``; a sanity warning passes with the warning in ``<system-out>`` (it is not a
failure of the gate, see :mod:`rcomp.export.check`). ``errors`` is always 0: bad input never gets
this far (exit 2, no report).
"""

from __future__ import annotations

import datetime
import platform
import xml.etree.ElementTree as ET
from pathlib import Path

from rcomp.reports import write_bytes_atomic

GROUPS = {
    "opset": "integrity", "metadata": "integrity",
    "mops": "budgets", "params": "budgets", "ops_fraction": "budgets", "params_fraction": "budgets",
    "latency_p90_ms": "budgets", "clean_acc": "robustness", "adv_acc": "robustness",
}
STAGE = {"mops": "cost", "latency_p90_ms": "latency", "adv_acc": "robustness"}  # rows that carry their stage's time
FAILURE_TYPE = {"integrity": "IntegrityFailure", "budgets": "BudgetExceeded", "robustness": "FloorMissed",
                "regression": "Regression"}


def _num(v) -> str:
    return "-" if v is None else f"{v:.6g}"


def _testcase(suite, row, group: str, profile: str, seconds: float) -> tuple[int, int]:
    """Append one testcase; returns (failures, skipped) it adds."""
    name = f"{row.name} vs baseline" if group == "regression" else row.name
    case = ET.SubElement(suite, "testcase", name=name, classname=f"rcomp.check.{profile}.{group}",
                         time=f"{seconds:.3f}")
    text = f"value: {_num(row.value)} {row.unit}\nlimit: {_num(row.limit)} {row.unit}\ndetail: {row.detail}\n"
    if row.status == "skipped":
        ET.SubElement(case, "skipped", message=row.detail)
        return 0, 1
    if row.status != "pass":
        kind = "NotEvaluated" if row.status == "not evaluated" else FAILURE_TYPE[group]
        ET.SubElement(case, "failure", message=row.summary(group == "regression"), type=kind).text = text
        return 1, 0
    ET.SubElement(case, "system-out").text = text
    return 0, 0


def _sanity_case(suite, item: dict, profile: str) -> None:
    case = ET.SubElement(suite, "testcase", name=item["name"], classname=f"rcomp.check.{profile}.sanity", time="0.000")
    prefix = "" if item["ok"] else "WARNING (not a gate failure): "
    ET.SubElement(case, "system-out").text = prefix + item["detail"] + "\n"


def junit_xml(report) -> bytes:
    """The XML document for a :class:`rcomp.export.check.CheckReport`."""
    profile = report.profile
    seconds = report.metrics.get("seconds", {})
    groups: dict[str, list] = {}
    for row in report.rows:
        groups.setdefault(GROUPS.get(row.name, "budgets"), []).append(row)
    regressions = report.regression_rows
    root = ET.Element("testsuites", name=f"rcomp check {profile}")
    stamp = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    totals = [0, 0, 0, 0.0]  # tests, failures, skipped, time
    for group in ("integrity", "budgets", "robustness", "sanity", "regression"):
        rows = regressions if group == "regression" else groups.get(group, [])
        items = report.sanity if group == "sanity" else rows
        if not items:
            continue
        suite = ET.SubElement(root, "testsuite", name=f"rcomp check: {group}", timestamp=stamp, hostname=platform.node())
        fails = skips = 0
        t_suite = 0.0
        if group == "sanity":
            for item in items:
                _sanity_case(suite, item, profile)
        else:
            for row in rows:
                t = float(seconds.get(STAGE.get(row.name, ""), 0.0)) if group != "regression" else 0.0
                f, s = _testcase(suite, row, group, profile, t)
                fails, skips, t_suite = fails + f, skips + s, t_suite + t
        suite.set("tests", str(len(items)))
        suite.set("failures", str(fails))
        suite.set("errors", "0")
        suite.set("skipped", str(skips))
        suite.set("time", f"{t_suite:.3f}")
        totals = [totals[0] + len(items), totals[1] + fails, totals[2] + skips, totals[3] + t_suite]
    root.set("tests", str(totals[0]))
    root.set("failures", str(totals[1]))
    root.set("errors", "0")
    root.set("skipped", str(totals[2]))
    root.set("time", f"{totals[3]:.3f}")
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode").encode("utf-8") + b"\n"


def write_junit(report, path) -> Path:
    """Write the JUnit file atomically (a CI never reads half of one); its folder is made, like --report-dir."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(Path(path), junit_xml(report))
