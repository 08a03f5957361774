"""QDC: quality, diversity and complexity measures of any synthetic (or real) math dataset.

  datasets.py   read SPARQ archives, phase-2 sets, EI / SFT records, GSM8K / MATH / SVAMP /
                AIME files, generic question/solution/answer rows, lab splits -> rows
  measures.py   distinct-n, self-BLEU, embedding dispersion, Vendi score, nearest-neighbour
                distance (pure functions)
  profile.py    every measure of one dataset (quality, diversity, complexity)
  report.py     report.md / PNGs side by side

The workload is `experiments/qdc.py` (`python -m qdc_jax.main --config=configs/qdc.py`).
"""
