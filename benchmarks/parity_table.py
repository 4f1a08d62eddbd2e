"""Print a bundle's measured parity (from its recon.json) as the README's markdown table.

python -m benchmarks.parity_table models/demo
"""

from __future__ import annotations

import sys
from pathlib import Path

from recon_runtime.contract import read_contract


def table(bundle: Path) -> str:
    contract = read_contract(bundle)
    results = contract.validation.get("results", {})
    src = contract.source
    lines = [
        f"Measured by `recon-export` on {contract.created[:10]} ({src.get('model')}, seed {src.get('seed')}; "
        f"onnxruntime {contract.tools.get('onnxruntime')} CPU vs PyTorch {contract.tools.get('torch')} fp32):",
        "",
        "| precision | encoder | decoder | vocoder | chain | threshold |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for precision, report in results.items():
        cells = [f"{report[k]['rel_l2']:.1e}" for k in ("encoder", "decoder", "vocoder", "chain")]
        lines.append(f"| {precision} | " + " | ".join(cells) + f" | {report['encoder']['threshold']:.0e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "models/demo")))
