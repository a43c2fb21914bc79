"""One complete output directory: exports + recipe + report of one result, written together.

Every front end that writes a result to a folder (``workbench compress``, the window's Export,
`core.session.Session.export`) goes through `write_outputs`, so the files always come from the
same run and appear together or not at all (`core.outdir.OutputTransaction`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.plan import CompressionPlan
from core.progress import CancelToken, ProgressFn, no_progress, scaled


def owned_names() -> tuple[str, ...]:
    """Names a compress run writes or makes stale: every export file, recipe and report."""
    from core.export import FILE_NAMES

    return (*FILE_NAMES.values(), "recipe.json", "report.json", "report.html")


def write_outputs(
    result: Any,
    formats: Sequence[str],
    out: str | Path,
    *,
    plan: CompressionPlan | None = None,
    evals: Mapping[str, Any] | None = None,
    data: Any = None,
    force: bool = False,
    merge_existing: bool = False,
    owned: Collection[str] | None = None,
    report: bool = True,
    entropy: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> tuple[list[Any], dict[str, Any] | None]:
    """Write ``result`` in ``formats`` plus ``recipe.json`` and the report into ``out``.

    Parameters
    ----------
    plan
        The recipe to record (default: the result's own plan).
    evals
        ``{"before": EvalResult, "after": EvalResult, "data": name}`` for the report.
    data
        Held-out inputs used to verify exports (ONNX outputs, int8 calibration).
    force
        Replace this run's files where they exist (refused up front otherwise).
    merge_existing
        Keep every other file of an existing ``out`` (the window's Export adds files);
        without it the folder describes this run alone (user files are still kept).

    Returns
    -------
    (records, report)
        The `core.export.ExportRecord`s (paths where the files now are) and the report's
        JSON content (``None`` when ``report`` is False).
    """
    from core.export import export_all
    from core.outdir import output_dir, pause_point
    from core.report import write_report

    out = Path(out)
    with output_dir(
        out,
        force=force,
        merge_existing=merge_existing,
        owned=owned_names() if owned is None else owned,
    ) as stage:
        records = export_all(
            result,
            list(formats),
            stage,
            force=force,
            data=data,
            entropy=entropy,
            progress=scaled(progress, 0, 0.9),
            cancel=cancel,
        )
        # Records name each file where it will be once the staging folder is committed.
        records = [replace(r, path=out / r.path.name) for r in records]
        pause_point("exported")
        (plan or result.plan).save(stage / "recipe.json")
        content = None
        if report:
            json_path, _ = write_report(result, stage, evals=evals or {}, exports=records)
            content = json.loads(Path(json_path).read_text(encoding="utf-8"))
    return records, content
