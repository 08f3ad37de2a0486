"""The machinery around the paper's six files: run folders and checkpoints (runkeeping), several
processes (distributed), low-rank adapters (lora), the laptop presets and their synthetic data
(presets, synthetic), the benchmarks' label formats (label_formats), reading video frames
(frames), the shared prompt of a GRPO group (prompt_sharing), figures and result files (plots,
reports), the tools' command-line conventions (cli) and files on disk (files)."""
