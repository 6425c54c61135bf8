"""math-verify worker process: JSON lines in on stdin, JSON lines out on stdout.

Run as a script by `math_verifier.MathWorkerPool` (never imported by the package). It exists
because math-verify can hang or blow up on adversarial input (its own timeout uses
signal.alarm and refuses to run off the main thread); a separate process is something the
parent can actually kill and replace.

Request:  {"gold": str, "pred": str}
Response: {"correct": bool, "pred_parsed": str, "gold_parsed": str, "error": str | null}
"""
import json
import resource
import sys


def main():
    # A per-process address-space cap: a sympy blow-up ends in MemoryError, not in the OOM killer.
    as_bytes = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if as_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # Gold answers are usually bare ("1/2", "\\frac{1}{2}"): allow extraction without anchors.
    gold_cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    pred_cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        resp = {"correct": False, "pred_parsed": "", "gold_parsed": "", "error": None}
        try:
            gold_text = req["gold"]
            if "$" not in gold_text and "\\boxed" not in gold_text:
                gold_text = f"${gold_text}$"  # bare LaTeX/plain answers parse as math mode
            gold = parse(gold_text, extraction_config=gold_cfg, parsing_timeout=None)
            pred = parse(req["pred"], extraction_config=pred_cfg, parsing_timeout=None)
            resp["gold_parsed"] = str(gold[0]) if gold else ""
            resp["pred_parsed"] = str(pred[0]) if pred else ""
            if not gold:
                resp["error"] = "gold answer did not parse"
            elif not pred:
                resp["error"] = "no answer found in response"
            else:
                resp["correct"] = bool(verify(gold, pred, timeout_seconds=None))
        except Exception as exc:  # noqa: BLE001 - any failure is a wrong answer, with the reason
            resp["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out.write(json.dumps(resp) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
