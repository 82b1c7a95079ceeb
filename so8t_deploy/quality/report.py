"""The quality report: a Markdown table, the same as JSON, and a plot of size against mean KL."""

from __future__ import annotations

from pathlib import Path

from .evaluate import QuantQuality, as_json


def _without(r: QuantQuality) -> tuple[str, str]:
    if r.without_mean_kl is None or r.without_top1 is None:
        return "-", "-"
    return f"{r.without_mean_kl:.5f}", f"{r.without_top1:.3f}"


def markdown_table(results: list[QuantQuality]) -> str:
    with_imatrix = any(r.imatrix for r in results)
    extra = " mean KL w/o imatrix | top-1 w/o imatrix |" if with_imatrix else ""
    lines = [f"| tag | quant | vs | mean KL | p99 KL | top-1 |{extra} perplexity | size MiB | bpw | tokens/s |",
             "|---|---|---|---|---|---|" + ("---|---|" if with_imatrix else "") + "---|---|---|---|"]
    for r in results:
        without = "".join(f" {cell} |" for cell in _without(r)) if with_imatrix else ""
        lines.append(f"| {r.tag} | {r.quant} | {r.reference} | {r.mean_kl:.5f} | {r.p99_kl:.5f} | {r.top1:.3f} |"
                     f"{without} {r.perplexity:.2f} | {r.size / 2**20:.1f} | {r.bits_per_weight:.2f} | "
                     f"{r.tokens_per_second:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[QuantQuality], path: Path, title: str) -> None:
    """Size against mean KL, a line per variant; with an importance matrix, each variant's ladder without it
    as a dashed line of the same colour."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here, nor on a CI runner
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    labelled: set[str] = set()  # one label per quant level: variants share sizes, labels would overlap
    imatrix = any(r.imatrix for r in results)
    for variant in dict.fromkeys(r.variant for r in results):
        points = sorted((r for r in results if r.variant == variant), key=lambda r: r.size)
        sizes = [r.size / 2**20 for r in points]
        kls = [r.mean_kl for r in points]
        (line,) = ax.plot(sizes, kls, marker="o", label=f"{variant} (imatrix)" if imatrix else variant)
        for r, x, y in zip(points, sizes, kls, strict=True):
            if r.quant not in labelled:
                labelled.add(r.quant)
                ax.annotate(r.quant, (x, y), textcoords="offset points", xytext=(4, 5), fontsize=8)
        # The ladder without it: the levels quantized without it, and the float levels both ladders share.
        plain = sorted((r.without_size / 2**20, r.without_mean_kl) if r.without_size is not None and
                       r.without_mean_kl is not None else (r.size / 2**20, r.mean_kl)
                       for r in points if r.without_size is not None or not r.imatrix)
        if imatrix and plain:
            ax.plot(*zip(*plain, strict=True), marker="s", linestyle="--", color=line.get_color(), alpha=0.8,
                    label=f"{variant} (no imatrix)")
    ax.set_xlabel("GGUF size (MiB)")
    ax.set_ylabel("mean KL divergence vs float reference (nats)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title="variant")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(results: list[QuantQuality], directory: Path, name: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "quality.md", directory / "quality.json", directory / "quality.png"]
    paths[0].write_text(f"# Quant quality: {name}\n\n{markdown_table(results)}", encoding="utf-8")
    paths[1].write_text(as_json(results) + "\n", encoding="utf-8")
    plot(results, paths[2], f"{name}: size vs quality loss")
    return paths
