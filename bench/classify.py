"""How fast and how accurate the built-in prompt classifier is.

    python -m bench.classify [--data tests/data/prompts.jsonl] [--repeat 200] [--errors]

Loads the labelled prompts and times `PromptClassifier.classify_payload` on each request
body, `--repeat` times over the whole set after one warm-up pass. It prints p50, p99 and
mean per request in ms next to the target, then the accuracy and the confusion matrix
(rows = true category, columns = predicted). `--errors` also lists the misclassified prompts.

The per-request times include only the classification, not JSON decoding. It never asserts
on time: the target is printed next to the numbers, nothing fails on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metering.categories.classifier import DEFAULT_CATEGORIES, PromptClassifier
from tests.support.paths import TEST_DATA

TARGET_P50_MS = 0.2  # printed next to the numbers, never enforced
DEFAULT_DATA = TEST_DATA / "prompts.jsonl"


def load(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(category, request body) pairs from a JSON-lines file."""
    rows: list[tuple[str, dict[str, Any]]] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                body = {k: v for k, v in row.items() if k != "category"}
                rows.append((row["category"], body))
    return rows


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile `q` (0..100) of already sorted values."""
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def time_requests(
    clf: PromptClassifier, bodies: Sequence[dict[str, Any]], repeat: int
) -> list[float]:
    """Seconds per classify_payload call, one entry per request per repetition."""
    for body in bodies:  # warm-up
        clf.classify_payload(body)
    clock = time.perf_counter
    times_s: list[float] = []
    for _ in range(repeat):
        for body in bodies:
            t0 = clock()
            clf.classify_payload(body)
            times_s.append(clock() - t0)
    return times_s


def confusion_table(pairs: Sequence[tuple[str, str]], categories: Sequence[str]) -> list[list[int]]:
    """counts[true][predicted], in the order of `categories`."""
    index = {c: i for i, c in enumerate(categories)}
    counts = [[0] * len(categories) for _ in categories]
    for true, pred in pairs:
        counts[index[true]][index[pred]] += 1
    return counts


def format_confusion(counts: list[list[int]], categories: Sequence[str]) -> str:
    short = [c[:6] for c in categories]
    width = max(len(c) for c in categories)
    head = " " * (width + 2) + " ".join(f"{s:>6}" for s in short) + "   recall"
    lines = [head]
    for c, row in zip(categories, counts, strict=True):
        total = sum(row)
        recall = row[categories.index(c)] / total if total else 0.0
        cells = " ".join(f"{n:>6}" if n else f"{'.':>6}" for n in row)
        lines.append(f"{c:<{width}}  {cells}   {recall:6.1%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeat", type=int, default=200, help="passes over the set (default 200)")
    ap.add_argument("--errors", action="store_true", help="list the misclassified prompts")
    args = ap.parse_args(argv)

    rows = load(args.data)
    clf = PromptClassifier(DEFAULT_CATEGORIES)
    bodies = [body for _, body in rows]
    sizes = sorted(len(json.dumps(b, ensure_ascii=False)) for b in bodies)

    times_ms = sorted(t * 1000.0 for t in time_requests(clf, bodies, max(1, args.repeat)))
    p50, p99 = percentile(times_ms, 50), percentile(times_ms, 99)
    print(
        f"{len(rows)} requests (body size p50 {percentile(sizes, 50)} chars, "
        f"max {sizes[-1]}), {len(times_ms)} timed calls"
    )
    verdict = "ok" if p50 < TARGET_P50_MS else "MISS"
    print(f"classify_payload  p50 {p50:.4f} ms  (target < {TARGET_P50_MS} ms: {verdict})")
    print(f"                  p99 {p99:.4f} ms")
    print(f"                 mean {statistics.fmean(times_ms):.4f} ms")

    huge = {"messages": [{"role": "user", "content": "lorem ipsum dolor sit amet " * 40_000}]}
    huge_ms = sorted(t * 1000.0 for t in time_requests(clf, [huge], 20))
    print(f"1 MB user message p50 {percentile(huge_ms, 50):.4f} ms (bounded by the clipping)")

    pairs = [(true, clf.classify_payload(body)) for true, body in rows]
    correct = sum(1 for t, p in pairs if t == p)
    print(f"\naccuracy {correct}/{len(pairs)} = {correct / len(pairs):.1%}\n")
    cats = list(DEFAULT_CATEGORIES)
    print("rows = true category, columns = predicted")
    print(format_confusion(confusion_table(pairs, cats), cats))

    if args.errors:
        print("\nmisclassified:")
        for (true, body), (_, pred) in zip(rows, pairs, strict=True):
            if true != pred:
                text = json.dumps(body, ensure_ascii=False)
                print(f"  {true:>13} -> {pred:<13} {text[:150]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
