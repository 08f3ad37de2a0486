"""What drives the paper's six files, imported only where a command starts: grpo.py's settings and
command line (config), setting a run up (run), loading the next pictures (prefetch), checkpoints,
resume and stopping (checkpoints), the run's logs, evaluations and end (logs), several processes and
FSDP2 (distributed), low-rank adapters (lora), the laptop presets (presets), and the pages, figures
and result files of grpo.py and evaluate.py (report_page, plots, reports)."""
