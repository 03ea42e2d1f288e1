"""Reading results: energy on a zero-skipping accelerator (:mod:`deft.analysis.energy`), figures
(:mod:`deft.analysis.plots`, :mod:`deft.analysis.report_plots`), accuracy / density trade-offs
(:mod:`deft.analysis.tradeoff`) and the HTML / Markdown run report (:mod:`deft.analysis.report`)."""
