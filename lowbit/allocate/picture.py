"""A picture of a plan: each layer's sensitivity per option across depth, and the bits chosen."""
from __future__ import annotations

from lowbit.errors import LowbitError


def draw_plan(plan: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LowbitError("drawing the plan needs matplotlib: pip install matplotlib") from None
    names = list(plan["layers"])
    options = list(plan["options"])
    bits = [plan["options"][plan["layers"][n]["scheme"]]["bits"] for n in names]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(names) * 0.12), 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for o in options:
        top.plot(range(len(names)), [max(plan["layers"][n]["scores"][o], 1e-30) for n in names], ".-", label=o, lw=0.8)
    top.set_yscale("log")
    top.set_ylabel(f"sensitivity ({plan['metric']})")
    top.legend(fontsize=8)
    top.set_title(f"{plan['achieved_bits']:.3f} average bits (target {plan['target_bits']}), solver {plan['solver']}")
    bottom.bar(range(len(names)), bits, color="tab:blue")
    bottom.set_ylabel("bits chosen")
    step = max(1, len(names) // 40)
    bottom.set_xticks(range(0, len(names), step))
    bottom.set_xticklabels([names[i].split(".", 2)[-1] for i in range(0, len(names), step)], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
