"""``lipexp report DIR``: the tables, CSVs and figures of a folder of runs (lipexp.report)."""

import sys
from pathlib import Path


def report_command(folder: str, baseline: str = "J0") -> int:
    """Write the report of ``folder`` (``baseline``: the defence each one is compared with,
    lipexp.report.paired); print where the files are. Exit status 1 when
    ``folder`` does not exist or holds no results.json."""
    from lipexp.report import report  # imported here: torch and matplotlib load slowly

    if not Path(folder).is_dir():
        print(f"lipexp report: error: {folder} does not exist or is not a folder",
              file=sys.stderr)
        return 1
    try:
        summary = report(folder, baseline)
    except FileNotFoundError as e:
        print(f"lipexp report: error: {e}", file=sys.stderr)
        return 1
    files = summary["files"]
    print(f"{len(summary['rows'])} table rows (grid x defence), "
          f"{len(summary['failed'])} failed and {len(summary['unfinished'])} unfinished runs")
    for path in [files["markdown"], files["adversarial_csv"], files["stability_csv"],
                 files["attacks_csv"], *files["figures"]]:
        print(path)
    return 0
