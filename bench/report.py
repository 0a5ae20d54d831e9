"""Turn a concurrency_bench.py JSON (and the decode ceiling's table) into the markdown of bench/RESULTS.md.

    python bench/report.py bench.json ceiling.txt [profile.json]
"""

from __future__ import annotations

import json
import re
import sys

TARGET_DECODE_1 = 0.85
TARGET_TOTAL = 0.80


def ceiling(path: str) -> dict[int, float]:
    """batch -> tok/s from decode_ceiling.py's table."""
    out = {}
    for line in open(path):
        m = re.match(r"\|\s*(\d+)\s*\|\s*\d+\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", line)
        if m:
            out[int(m.group(1))] = float(m.group(3))
    return out


def main() -> None:
    bench = json.load(open(sys.argv[1]))
    ceil = ceiling(sys.argv[2])
    lines = [f"GPU {bench['gpu']}, torch {bench['torch']}, transformers {bench['transformers']}, "
             f"{bench['date']}; KV pool {bench['kv_blocks']} blocks; decode graphs {bench['graphs']}.", ""]
    single = bench["single"]
    lines += ["| single stream | measured | target | |", "| --- | --- | --- | --- |"]
    d1 = single["decode_tok_s"]
    c1 = ceil.get(1, float("nan"))
    lines.append(f"| decode, batch 1 | {d1:.0f} tok/s | >= {TARGET_DECODE_1:.0%} of ceiling {c1:.0f} = "
                 f"{TARGET_DECODE_1 * c1:.0f} | {d1 / c1:.0%} of ceiling |")
    for res in ("720p", "1080p"):
        r = single[res]
        lines.append(f"| turn-1 TTFT {res} ({r['prompt_tokens']} tokens) | {r['turn1_ttft_ms']:.0f} ms vs bare "
                     f"prefill {r['bare_prefill_ms']:.0f} ms | <= 1.2x | {r['turn1_vs_bare']:.2f}x |")
        lines.append(f"| turn-2 TTFT {res} after a 128-token answer ({r['turn2_cached']} of {r['turn2_prompt']} "
                     f"reused) | {r['turn2_ttft_ms']:.0f} ms | <= 20% of turn 1 | {r['turn2_vs_turn1']:.0%} |")
    lines += ["", "| N | phase | total tok/s | ceiling at N | share | per-user tok/s | TTFT p50 / p95 ms | "
              "inter-token p95 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, phases in bench["concurrency"].items():
        for name in ("turn1", "turn2"):
            p = phases[name]
            c = ceil.get(int(n))
            share = f"{p['total_tok_s'] / c:.0%}" if c and name == "turn2" else ""
            lines.append(f"| {n} | {name} | {p['total_tok_s']:.0f} | {c or '':.0f} | {share} | "
                         f"{p['per_user_tok_s']:.0f} | {p['ttft_p50_ms']:.0f} / {p['ttft_p95_ms']:.0f} | "
                         f"{p['itl_p95_ms']:.1f} |" if c else
                         f"| {n} | {name} | {p['total_tok_s']:.0f} | | | {p['per_user_tok_s']:.0f} | "
                         f"{p['ttft_p50_ms']:.0f} / {p['ttft_p95_ms']:.0f} | {p['itl_p95_ms']:.1f} |")
    lines += ["", "| arrival: budget | newcomer TTFT | bare prefill | ratio (<= 1.5x) | others' largest gap "
              "(<= 50 ms) |", "| --- | --- | --- | --- | --- |"]
    for a in bench["arrival"]:
        lines.append(f"| {a['batch_tokens']} | {a['ttft_ms']:.0f} ms | {a['bare_prefill_ms']:.0f} ms | "
                     f"{a['ttft_vs_bare']:.2f}x | {a['others_max_gap_ms']:.0f} ms |")
    if "long" in bench:
        lg = bench["long"]
        lines += ["", f"An {lg['tokens']}-token conversation (four 1080p images + 64 tokens) with "
                  f"`--kv-cache-mb {lg['kv_cache_mb']}`: {lg['seconds']:.2f} s, peak {lg['peak_gib']:.1f} GiB "
                  "(target: 22 GiB)."]
    if len(sys.argv) > 3:
        prof = json.load(open(sys.argv[3]))
        lines += ["", "| batch | captured step, compiled ops | plain ops | engine step: model | schedule | sample | "
                  "advance per row |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for b, e in prof.get("engine", {}).items():
            g = prof.get("graph_ms", {})
            lines.append(f"| {b} | {g.get('compiled', {}).get(b, float('nan')):.2f} ms | "
                         f"{g.get('plain', {}).get(b, float('nan')):.2f} ms | {e['model_ms']:.2f} ms | "
                         f"{e['schedule_ms']:.2f} ms | {e['sample_ms']:.2f} ms | {e['advance_per_row_ms']:.3f} ms |")
        turn2 = prof.get("turn2", {})
        if turn2 and not isinstance(next(iter(turn2.values())), dict):  # an older file: one mode
            turn2 = {"compiled": turn2}
        if "turn2_split" in prof:
            lines += ["", f"turn-2 step split: {json.dumps(prof['turn2_split'])}"]
        for mode, phases in turn2.items():
            lines += ["", f"turn-2 step ({mode} layer ops), ms: " + ", ".join(
                f"{k} {v:.1f}" for k, v in phases.items() if isinstance(v, float))]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
