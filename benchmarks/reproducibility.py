"""Do two runs of the pipeline give the same result? Compares two work folders of ``benchmarks/pipeline_run.py``
(or two ``dvc repro`` checkouts): every file under ``data/`` and ``models/`` byte for byte (restart bookkeeping in
dot-folders aside), and every metrics JSON under ``metrics/`` and each model's ``training.json`` with their
timing fields left out (wall time and throughput differ between any two runs).

    python benchmarks/pipeline_run.py --profile none --work /tmp/run-a
    python benchmarks/pipeline_run.py --profile none --work /tmp/run-b
    python benchmarks/reproducibility.py /tmp/run-a /tmp/run-b --json reproducibility.json

Exit code 0 when everything compared is identical, 1 otherwise (the differing files are listed). ``--shared-only``
compares what both runs have (a rerun of the first stages against a whole run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

COMPARED = ("data", "models")  # byte for byte
METRICS = "metrics"  # JSON, timing fields left out
TIMING_KEYS = ("seconds", "samples_per_s", "per_s", "throughput", "wall", "elapsed")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _without_timing(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _without_timing(v) for k, v in node.items() if not any(t in k.lower() for t in TIMING_KEYS)
        }
    if isinstance(node, list):
        return [_without_timing(v) for v in node]
    return node


def fingerprint(work: Path) -> dict[str, str]:
    """``relative path -> digest`` of every compared file of one run."""
    found: dict[str, str] = {}
    for folder in COMPARED:
        for path in sorted((work / folder).rglob("*")):
            # dot-folders hold restart bookkeeping (preprocess's .processed.state names the folders it read)
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(work).parts):
                found[str(path.relative_to(work))] = _digest(path)
    # metrics, and the training record an exported model carries (models/*/training.json), hold timings too
    for path in [
        *sorted((work / METRICS).rglob("*.json")),
        *sorted((work / "models").rglob("training.json")),
    ]:
        body = json.dumps(_without_timing(json.loads(path.read_text())), sort_keys=True)
        found[str(path.relative_to(work))] = hashlib.sha256(body.encode()).hexdigest()
    return found


def compare(a: Path, b: Path) -> dict[str, Any]:
    fa, fb = fingerprint(a), fingerprint(b)
    shared = sorted(set(fa) & set(fb))
    return {
        "a": str(a),
        "b": str(b),
        "compared": len(shared),
        "identical": sum(fa[k] == fb[k] for k in shared),
        "different": [k for k in shared if fa[k] != fb[k]],
        "only_in_a": sorted(set(fa) - set(fb)),
        "only_in_b": sorted(set(fb) - set(fa)),
        "weights_compared": sum(k.endswith((".safetensors", ".pth")) for k in shared),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="one run's work folder")
    parser.add_argument("b", type=Path, help="the other run's work folder")
    parser.add_argument("--json", help="also write the comparison here")
    parser.add_argument(
        "--shared-only",
        action="store_true",
        help="ignore files only one run has (a run of the first stages only)",
    )
    args = parser.parse_args(argv)
    result = compare(args.a, args.b)
    print(
        f"{result['identical']} of {result['compared']} files identical "
        f"({result['weights_compared']} weight files; metrics without timing fields)"
    )
    for key in ("different", "only_in_a", "only_in_b"):
        for name in result[key]:
            print(f"  {key.replace('_', ' ')}: {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    one_sided = not args.shared_only and (result["only_in_a"] or result["only_in_b"])
    same = not (result["different"] or one_sided)
    return 0 if same and result["compared"] else 1


if __name__ == "__main__":
    sys.exit(main())
