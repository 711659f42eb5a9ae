"""moelang: how Mixture-of-Experts language models route languages, and cheap adaptation to new ones.

One module per pipeline stage (corpus, tokenize, overlap, ...), each a plain function plus a
subcommand of ``python -m moelang``; the Snakemake workflow (``workflow/Snakefile``) calls those subcommands.
"""

__version__ = "0.1.0"
