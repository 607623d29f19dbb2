"""`mmcurate report`: one self-contained HTML page for any scored pool (SPEC §8).

Histograms with the cut-offs, the selection funnel, examples at the top, the cut-off and the
bottom of each score column, SemDeDup groups and NormSim extremes; the demo's report is this
page plus its ground truth.
"""

from mmcurate.report.build import ReportConfig, build_sections, write_report

__all__ = ["ReportConfig", "build_sections", "write_report"]
