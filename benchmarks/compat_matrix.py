"""The runtime-feature compatibility matrix (`ttalign.compat`): every method and the plain call, on every family's
tiny components, with each speed / memory feature; each cell `same` (with the largest pixel difference to the run
without the feature), `refused` (with its message), `n/a` or a failure. Writes `compat_matrix.json` and `.md`.

    python benchmarks/compat_matrix.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_results  # noqa: E402

from ttalign.compat import FEATURES, METHODS, run_cell  # noqa: E402
from ttalign.pipelines import FAMILIES  # noqa: E402

SYMBOL = {
    "same": "ok",
    "reselects": "ok*",
    "refused": "refused",
    "gpu": "GPU",
    "n/a": "n/a",
    "differs": "**differs**",
    "error": "**error**",
}


def markdown(cells: list[dict], command: str) -> str:
    families = list(dict.fromkeys(c["family"] for c in cells))
    features = list(dict.fromkeys(c["feature"] for c in cells))
    lines = [
        "# Runtime features x methods",
        "",
        f"`{command}`",
        "",
        "Each cell: the method on the family's tiny components with the feature on, against the same call without it "
        "(`ok`: the same images within the feature's tolerance; `ok*`: a selection method chose other candidates "
        "because the feature changed the pixels its reward scores; `refused`: a clear error, listed below; `GPU`: "
        "the feature needs an accelerator, whatever the method; `n/a`: the family has no such feature).",
        "",
    ]
    notes: dict[tuple[str, str], list[str]] = {}
    for family in families:
        lines += [f"## {family}", "", "| feature | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
        for feature in features:
            row = {c["method"]: c for c in cells if c["family"] == family and c["feature"] == feature}
            lines.append(f"| {feature} | " + " | ".join(SYMBOL[row[m]["status"]] for m in METHODS) + " |")
            for c in row.values():
                if c["status"] not in ("same", "reselects") and c["message"]:
                    where = notes.setdefault((feature, c["message"]), [])
                    if family not in where:
                        where.append(family)
        lines.append("")
    if notes:
        lines += ["## Messages", ""]
        lines += [f"- {feature} ({', '.join(where)}): {message}" for (feature, message), where in notes.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--features", default=",".join(FEATURES))
    parser.add_argument("--name", default="compat_matrix")
    parser.add_argument("--render", default=None, metavar="JSON", help="only rewrite the table of a run's JSON")
    args = parser.parse_args()
    if args.render:
        data = json.load(open(args.render))
        with open(os.path.splitext(args.render)[0] + ".md", "w", encoding="utf-8") as f:
            f.write(markdown(data["cells"], data["command"]))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    families, features = args.families.split(","), args.features.split(",")
    cells, start = [], time.perf_counter()
    for family in families:
        reference: dict = {}
        for feature in features:
            for method in METHODS:
                cell = run_cell(family, feature, method, reference)
                cells.append(cell.__dict__)
                print(family, feature, method, cell.status, cell.max_diff, cell.message[:120], flush=True)
    command = "python benchmarks/compat_matrix.py " + " ".join(sys.argv[1:])
    data = {
        "benchmark": "compat_matrix",
        "command": command.strip(),
        "seconds": time.perf_counter() - start,
        "cells": cells,
        "environment": environment(),
    }
    write_results(args.name, data, markdown(cells, command.strip()))


if __name__ == "__main__":
    main()
