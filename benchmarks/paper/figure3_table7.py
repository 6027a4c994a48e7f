"""Figure 3/4 and Table 7 on adapters trained by e2e.py: subspace similarity and amplification.

Figure 3: φ between the r=8 and r=64 adapters of one run setting (same seed); Figure 4: φ between two
seeds at r=8. Table 7: ‖UᵀWqVᵀ‖_F and the amplification factor ‖ΔWq‖_F / ‖UᵀWqVᵀ‖_F for r=4 (r=8 if there is no r=4
run) and r=64. Pairs whose runs are missing are skipped with a note.
Writes `lorakit analyze`-style reports (report.md + PNGs) into `--out` and prints the summary.

    .venv/bin/python benchmarks/paper/figure3_table7.py --runs runs --out runs/analysis
    .venv/bin/python benchmarks/paper/figure3_table7.py --quick    # CI: trains 30-step SST-2 adapters first (~2 min)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lorakit.analysis import analyze, layer_index, weight_type, write_report
from lorakit.models import load_model

PAPER_FIG3 = ("paper Fig. 3 (GPT-3, layer 48): the top direction of the r=8 and r=64 A matrices overlap strongly "
              "(φ(1,1) > 0.5), the others mostly do not; Fig. 4: two seeds at r=64 share their top directions.")
PAPER_T7 = ("paper Table 7 (GPT-3, layer 48, Wq): r=4: ‖ΔWq‖=6.91, ‖UᵀWqVᵀ‖ = 0.32 (ΔWq dirs) / 21.67 (Wq dirs) / "
            "0.02 (random), factor 21.5; r=64: 3.57, 1.90 / 37.71 / 0.33, factor 1.9")


def _mean(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder holding e2e-r8-s0, e2e-r64-s0, e2e-r8-s1, e2e-r4-s0")
    parser.add_argument("--prefix", default="e2e", help="run-name prefix: e2e (e2e.py) or sst2 (sst2_adapters.py)")
    parser.add_argument("--model", default="smollm2-135m", help="the adapters' base: smollm2-135m or minilm-l6")
    parser.add_argument("--out", default="runs/analysis")
    parser.add_argument("--quick", action="store_true",
                        help="train the four adapters with sst2_adapters.py --quick into a temp folder, then analyse them")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.quick:
        tmp = tempfile.mkdtemp(prefix="lorakit-fig3-")
        subprocess.run([sys.executable, str(Path(__file__).with_name("sst2_adapters.py")), "--quick", "--runs", tmp], check=True)
        args.runs, args.prefix, args.model = tmp, "sst2", "minilm-l6"
    runs = Path(args.runs)
    model, _ = load_model(args.model, "classification" if args.model == "minilm-l6" else "causal-lm")
    out = Path(args.out)
    x = args.prefix
    pairs = {"fig3_r8_vs_r64": (f"{x}-r8-s0", f"{x}-r64-s0"), "fig4_r8_seed0_vs_seed1": (f"{x}-r8-s0", f"{x}-r8-s1"),
             "table7_r4_vs_r64": (f"{x}-r4-s0", f"{x}-r64-s0")}
    if not (runs / f"{x}-r4-s0").is_dir():  # the r=4 run is optional: Table 7 then compares r=8 with r=64
        del pairs["table7_r4_vs_r64"]
        pairs["table7_r8_vs_r64"] = (f"{x}-r8-s0", f"{x}-r64-s0")
    for name, (a, b) in pairs.items():
        if not (runs / a).is_dir() or not (runs / b).is_dir():
            print(f"{name}: skipped, {runs / a} or {runs / b} missing (train them with e2e.py)")
            continue
        result = analyze([runs / a, runs / b], model if name.startswith("table7") else None)
        report = write_report(result, out / f"{x}_{name}")
        print(f"\n## {name}: {a} vs {b}  (report: {report})")
        for wt in sorted({weight_type(p) for p in result.similarity}):
            paths = [p for p in result.similarity if weight_type(p) == wt]
            k = result.adapters[0].layers[paths[0]].A.shape[1]
            for kind, phis in (("A (paper)", result.similarity), ("ΔW row space", result.delta_similarity)):
                phi = [phis[p] for p in paths]
                m = min(phi[0].shape)
                print(f"{wt}, {kind}: over {len(paths)} layers, φ(1,1) = {_mean([float(x[0, 0]) for x in phi])}; "
                      f"φ(i,j) mean over i,j ≤ {m} = {_mean([float(x[:m, :m].mean()) for x in phi])}; "
                      f"random-subspace φ(1,1) ≈ {1 / k:.4f}")
        if result.amplification:
            print("\n| layers | r | ‖ΔW‖_F | ‖UᵀWVᵀ‖ ΔW dirs | ‖UᵀWVᵀ‖ W dirs | ‖UᵀWVᵀ‖ random | ‖W‖_F | factor |")
            print("|---|---|---|---|---|---|---|---|")
            for wt in sorted({weight_type(p) for p in result.amplification}):
                paths = [p for p in result.amplification if weight_type(p) == wt]
                last = max(paths, key=lambda p: layer_index(p) or 0)
                for i in range(2):
                    for label, sel in ((f"{wt}, mean of {len(paths)} layers", paths), (f"{wt}, {last}", [last])):
                        amps = [result.amplification[p][i] for p in sel]

                        def avg(f, amps=amps):
                            return statistics.mean(f(a) for a in amps)

                        print(f"| {label} | {amps[0].r} | {avg(lambda a: a.delta_norm):.3f} | {avg(lambda a: a.proj_delta):.3f} | "
                              f"{avg(lambda a: a.proj_weight):.2f} | {avg(lambda a: a.proj_random):.3f} | "
                              f"{avg(lambda a: a.weight_norm):.2f} | {avg(lambda a: a.factor):.2f} |")
    print(f"\n{PAPER_FIG3}\n{PAPER_T7}")


if __name__ == "__main__":
    main()
