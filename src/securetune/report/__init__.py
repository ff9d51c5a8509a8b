"""Stage 9, the report: tables and figures with bootstrap confidence intervals.

`settings` (what the rule passes), `stats` (the numbers), `tables` (CSV and Markdown), `figures`
(the PNGs) and `build` (the one entry function, `build_report`). Nothing is imported here, so
the rules can import `securetune.report.settings` without matplotlib.
"""
