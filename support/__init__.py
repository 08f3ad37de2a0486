"""The machinery around the paper's six files: the shared prompt of a GRPO group (prompt_sharing),
run folders, checkpoints, logs and grpo.py's flags (runkeeping), several processes (distributed),
low-rank adapters (lora), the laptop presets and their synthetic data (presets, synthetic), the
benchmarks' label formats (label_formats), reading video frames (frames), the run's and evaluate's
pages, figures and result files (report_page, plots, reports), the authors' inference for evaluate.py
--protocol authors (authors_protocol), the tools' command-line conventions
(cli), files on disk (files) and the reward in plain loops (rewards_reference)."""
