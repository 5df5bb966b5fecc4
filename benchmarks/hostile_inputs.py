"""Hostile-input counts by kind (issue 19): attempts, held and failed, for this checkout or another one.

Runs tests/test_hostile.py (one case per hostile input) with `surgery` imported from CHECKOUT, and groups
the outcomes by kind. A case "held" when surgery did what docs/reliability.md says (refused with a
SurgeryError naming the place, or accepted with a warning); "failed" otherwise (a raw exception, a silent
acceptance, a wrong message, a traceback).

    python benchmarks/hostile_inputs.py                 # this checkout
    python benchmarks/hostile_inputs.py /work/main      # another checkout (e.g. before the fix)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = {
    "values that make the model useless": ("test_every_float_option", "test_booleans_are", "test_composition_weights",
                                           "test_validate_with_model_refuses"),
    "unbounded work": ("test_apply_estimates", "test_estimate_is", "test_estimating", "test_said_subspace", "test_each_include",
                       "test_include_depth", "test_nesting_depth", "test_deeply_nested_manifest"),
    "paths": ("test_a_checkpoint_names_only", "test_includes_stay", "test_save_does_not_follow"),
    "names": ("test_rule_names", "test_adapter_names", "test_saved_tensor_keys"),
    "raw exceptions": ("test_zero_slice_step", "test_manifest_field_types", "test_save_into_a_file"),
    "accepted though meaningless": ("test_a_spec_that_changes_nothing", "test_non_utf8", "test_cli_refuses"),
    "CLI tracebacks": ("test_cli_model_problems", "test_cli_deeply_nested", "test_cli_unexpected"),
    "messages": ("test_a_glob", "test_every_unknown_role", "test_a_match_error", "test_validate_with_model_counts",
                 "test_printed_merge_report"),
}


def kind_of(test: str) -> str:
    return next((k for k, prefixes in KINDS.items() if test.startswith(prefixes)), "other")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", nargs="?", default=str(ROOT), help="repository whose surgery package to test")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.checkout)}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        str(ROOT / "tests" / "test_hostile.py")], cwd=args.checkout, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cases = ET.parse(report).getroot().iter("testcase")
        counts: dict[str, Counter] = {}
        for case in cases:
            kind = kind_of(case.get("name"))
            bad = case.find("failure") is not None or case.find("error") is not None
            counts.setdefault(kind, Counter()).update(attempts=1, failed=int(bad), held=int(not bad))
    print(f"surgery from {os.path.abspath(args.checkout)}\n")
    print(f"| kind | attempts | held | failed |\n|---|---:|---:|---:|")
    total = Counter()
    for kind in list(KINDS) + ["other"]:
        if kind in counts:
            c = counts[kind]
            total.update(c)
            print(f"| {kind} | {c['attempts']} | {c['held']} | {c['failed']} |")
    print(f"| all | {total['attempts']} | {total['held']} | {total['failed']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
