"""SoundAtlas on the toy world: caption accuracy, hallucinations and cost of junior-only, senior-only and
the junior-senior handoff, measured against the toy world's ground truth.

    python -m omni2sound.atlas.toy_eval --out runs/atlas-toy --clips 1000

The agents are the rule-based simulations of `atlas.toy` (their error and hallucination rates are set in
the config), so these numbers measure what the pipeline's routing, handoff and filtering do with agents
that err at those rates, not how good any real captioning model is.
"""
from __future__ import annotations

import argparse
import json
import os

from .config import preset
from .runner import Runner, load_done, read_input_manifest
from .toy import caption_correct, has_hallucination, toy_truth, write_toy_manifest

MODES = ("junior-only", "senior-only", "auto")


def measure(out_dir: str) -> dict:
    """Accuracy and hallucination counts of one run's records (the non-discarded clips)."""
    recs = [r for r in load_done(out_dir).values() if r["atlas"]["status"] in ("kept", "filtered")]
    n = len(recs)
    m = {"captioned": n, "kept": 0, "correct": 0, "kept_correct": 0, "injected": 0, "hall_first": 0,
         "hall_final": 0, "hall_kept": 0, "senior": 0, "cost": 0.0, "caption_cost": 0.0}
    for r in load_done(out_dir).values():
        m["cost"] += r["atlas"].get("cost", 0.0)
        for c in r["atlas"].get("calls", []):
            if c["role"] in ("junior", "senior"):
                m["caption_cost"] += c["cost"]
    for r in recs:
        a = r["atlas"]
        audio, _ = toy_truth(r)
        first = a.get("junior_caption") or a.get("senior_caption") or ""
        drafts = [c for c in (a.get("junior_caption"), a.get("senior_caption")) if c]
        m["injected"] += sum(has_hallucination(c) for c in drafts)
        m["hall_first"] += has_hallucination(first)
        m["hall_final"] += has_hallucination(r["caption"])
        m["correct"] += caption_correct(r["caption"], audio)
        m["senior"] += a.get("author") == "senior"
        if a["status"] == "kept":
            m["kept"] += 1
            m["kept_correct"] += caption_correct(r["caption"], audio)
            m["hall_kept"] += has_hallucination(r["caption"])
    return m


def table(results: dict, n_clips: int) -> str:
    senior_cost = results["senior-only"]["cost"]
    senior_caption = results["senior-only"]["caption_cost"]
    rows = ["| pipeline | accuracy (captioned) | accuracy (kept) | kept | handed to senior | hallucinated: "
            "first draft / final / kept | injected hallucinations removed | cost (USD per 1k clips) | "
            "cost vs senior-only: all calls / captioning calls |", "|---" * 9 + "|"]
    for mode in MODES:
        m = results[mode]
        n, k = max(m["captioned"], 1), max(m["kept"], 1)
        removed = 1 - m["hall_kept"] / m["injected"] if m["injected"] else float("nan")
        lab = "handoff (`auto`)" if mode == "auto" else mode
        rows.append(f"| {lab} | {m['correct'] / n:.3f} | {m['kept_correct'] / k:.3f} | {m['kept']} / {m['captioned']} "
                    f"| {m['senior'] / n:.3f} | {m['hall_first'] / n:.3f} / {m['hall_final'] / n:.3f} / "
                    f"{m['hall_kept'] / k:.3f} | {removed:.3f} ({m['injected'] - m['hall_kept']} of {m['injected']}) "
                    f"| {1000 * m['cost'] / n_clips:.3f} | {m['cost'] / senior_cost:.3f} / "
                    f"{m['caption_cost'] / senior_caption:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    manifest = os.path.join(args.out, "toy", "manifest.jsonl")
    if not os.path.exists(manifest):
        write_toy_manifest(os.path.dirname(manifest), args.clips, seed=args.seed)
    records, problems = read_input_manifest(manifest)
    assert not problems, problems
    results = {}
    for mode in MODES:
        cfg = preset("toy")
        cfg.handoff = mode
        cfg.seed = args.seed
        out = os.path.join(args.out, mode)
        Runner(cfg, out, progress=True).run(records)
        results[mode] = measure(out)
    text = table(results, len(records))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
